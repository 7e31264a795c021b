"""Settings of a captioning job: what to read, which captioner, how to decode, what to write."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .prompts import resolve_instruction

__all__ = ["KINDS", "CaptionJobConfig", "GenerationSettings", "QualitySettings", "settings_hash"]

KINDS = ("long", "short", "both")


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding of one caption kind. Greedy (deterministic) unless ``temperature > 0``.

    repetition_penalty: 1.0 = off (Share-Captioner used 1.5 with beams; 1.05-1.2 curbs greedy loops);
    no_repeat_ngram_size: 0 = off (transformers-side only; vLLM has no such option).
    """

    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0 or self.temperature < 0:
            raise ValueError("no-repeat n-gram size and temperature must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class QualitySettings:
    """Thresholds of the quality flags (:mod:`.quality`); lengths are in the target model's tokenizer."""

    short_max_tokens: int = 30  # the paper: a caption under 30 tokens is a short one
    long_min_tokens: int = 30
    long_max_tokens: int = 500
    ngram: int = 4
    max_repeated_ngram_ratio: float = 0.3  # share of n-grams that repeat an earlier one
    min_compression_ratio: float = 0.3  # zlib bytes / text bytes below this: degenerate, loop-like text
    min_clip_score: float | None = None  # flag below this (100 x cosine), when a CLIP model scores


@dataclass
class CaptionJobConfig:
    """What to caption and how.

    input: an image folder, a .csv/.tsv/.parquet table (img2dataset columns) or webdataset shards (brace
    patterns); output: the job folder. backend: ``auto``, ``vladva`` (a VladVA model's own base, ``model`` +
    ``pretrained``), ``hf`` (``hf_model``: a local transformers image-text-to-text directory) or ``vllm``.
    kind: which captions to generate; only_missing: keep an existing caption as the short one (under
    ``quality.short_max_tokens`` target tokens) or the long one (otherwise) and generate only the other.
    target_tokenizer: the tokenizer lengths are counted in (an open_clip model name or a tokenizer directory;
    default: the captioner's). write_wds / write_csv: also write webdataset shards with ``long.txt`` / a
    TSV table that vladva-train reads.
    """

    input: str
    output: str
    backend: str = "auto"
    model: str | None = None
    pretrained: str | None = None
    hf_model: str | None = None
    kind: str = "long"
    only_missing: bool = False
    long_prompt: str = "long"
    short_prompt: str = "short"
    long_generation: GenerationSettings = field(default_factory=GenerationSettings)
    short_generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=48))
    quality: QualitySettings = field(default_factory=QualitySettings)
    target_tokenizer: str | None = None
    input_format: str = "auto"
    shard_size: int = 10_000
    batch_size: int = 16
    workers: int = 2
    device: str | None = None
    precision: str | None = None  # default: bf16 on GPU, fp32 on CPU
    img_key: str | None = None
    caption_key: str | None = None
    key_column: str | None = None
    csv_separator: str | None = None
    wds_caption_key: str = "txt"
    clip_model: str | None = None
    clip_pretrained: str | None = None
    write_wds: bool = False
    write_csv: bool = False
    vllm_args: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r}: choose from {list(KINDS)}")
        if self.shard_size < 1 or self.batch_size < 1 or self.workers < 0:
            raise ValueError("shard size and batch size must be >= 1 and workers >= 0")
        self.long_prompt = resolve_instruction(self.long_prompt)
        self.short_prompt = resolve_instruction(self.short_prompt)

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("long", "short") if self.kind == "both" else (self.kind,)

    def instruction(self, kind: str) -> str:
        return self.long_prompt if kind == "long" else self.short_prompt

    def generation(self, kind: str) -> GenerationSettings:
        return self.long_generation if kind == "long" else self.short_generation

    def decided_by(self) -> dict[str, Any]:
        """The settings that decide the captions' text (the settings hash); paths, batch size of the data
        loader, workers and progress do not."""
        return {
            "kind": self.kind, "only_missing": self.only_missing,
            "prompts": {k: self.instruction(k) for k in self.kinds},
            "generation": {k: dataclasses.asdict(self.generation(k)) for k in self.kinds},
            "quality": dataclasses.asdict(self.quality), "target_tokenizer": self.target_tokenizer,
            "clip": [self.clip_model, self.clip_pretrained] if self.clip_model else None,
        }


def settings_hash(record: Any) -> str:
    """A short, stable hash of a JSON-able record."""
    return hashlib.blake2b(json.dumps(record, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
