"""Does the model stay a captioner? (the paper's Fig. 7, made quantitative).

The same images are captioned by each model (greedy decoding, one instruction for all) and, on the synthetic
world, every caption is checked against its scene with :mod:`.caption_facts` (precision and recall of objects,
attributes, relations). Every model also scores the reference long captions: the mean next-token NLL per token
given the image and the captioning instruction (``reference_nll``), and given the image and the model's own
image prompt (``reference_nll_own_prompt``: the condition VladVA's AR loss trains); extra reference sets (e.g. the
same scenes described in another style) add ``reference_nll_<name>``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..progress import progress as tqdm
from . import _lvlm
from .caption_facts import FACT_KINDS, caption_facts, fact_scores
from .outputs import markdown_table, write_csv, write_json, write_text

__all__ = ["CAPTION_INSTRUCTION", "RetentionConfig", "RetentionResult", "Scenes", "caption_retention", "data_scenes",
           "world_scenes"]

#: the instruction the shipped captioner was pretrained with (``demo.pretrain_captioner.CAPTION_PROMPT``)
CAPTION_INSTRUCTION = "Describe the image in detail."


@dataclass
class RetentionConfig:
    """instruction: the captioning prompt; max_new_tokens: generation budget (greedy); max_caption_len: reference
    caption tokens scored; batch_size: images per forward/generation."""

    instruction: str = CAPTION_INSTRUCTION
    max_new_tokens: int = 128
    max_caption_len: int = 128
    batch_size: int = 16
    progress: bool = True

    def __post_init__(self):
        if not self.instruction.strip():
            raise ValueError("the captioning instruction is empty")
        if min(self.max_new_tokens, self.max_caption_len, self.batch_size) < 1:
            raise ValueError("max_new_tokens, max_caption_len and batch_size must be >= 1")


@dataclass
class Scenes:
    """Images with their reference long captions; ``scenes`` (synthetic world only) enables fact checking;
    ``extra_references``: more reference sets (name -> one caption per image), scored for NLL only."""

    images: list[Any]  # PIL images
    references: list[str]
    keys: list[str]
    scenes: list[Any] | None = None
    world_config: Any = None
    info: dict[str, Any] | None = None
    extra_references: dict[str, list[str]] = field(default_factory=dict)


def world_scenes(n: int, seed: int = 0, split: str = "test", long_captions: str | None = None,
                 extra_styles: Sequence[str] = ()) -> Scenes:
    """``n`` scenes of the synthetic world (rendered in memory) with their reference long captions in the style
    ``long_captions`` (None: the world's default), and the same scenes' descriptions in each of ``extra_styles``
    as extra reference sets."""
    from ..synth import World, WorldConfig

    if n < 1:
        raise ValueError(f"need at least one scene, got n={n}")
    config = WorldConfig(seed=seed)
    world = World(config if long_captions is None else config.with_(long_captions=long_captions))
    long_captions = world.config.long_captions
    samples = [world.sample(split, i) for i in range(n)]
    extra = {}
    for style in extra_styles:
        other = World(WorldConfig(seed=seed, long_captions=style))
        extra[style] = [other.sample(split, i).long for i in range(n)]  # same scenes: one stream per purpose
    return Scenes([world.render(s.scene) for s in samples], [s.long for s in samples],
                  [f"{split}/{s.index}" for s in samples], [s.scene for s in samples], world.config,
                  {"world_seed": seed, "split": split, "n": n, "long_captions": long_captions}, extra)


def data_scenes(data) -> Scenes:
    """Images of paired analysis data with each image's first caption as the reference (no fact checking)."""
    if not data.paired:
        raise ValueError("retention on real images needs paired captions (--data): they are the references")
    first: dict[int, str] = {}
    for caption, owner in zip(data.captions, data.caption_image.tolist()):
        first.setdefault(owner, caption)
    keep = sorted(first)
    return Scenes([data.images.load(i) for i in keep], [first[i] for i in keep],
                  [data.images.keys[i] for i in keep], info={"data": data.info})


@dataclass
class RetentionResult:
    """``summary[model]``: mean fact precision/recall per kind (%), unparsed sentences, reference NLLs;
    ``captions[model]``: one record per image (generated text and its scores)."""

    models: list[str]
    summary: dict[str, dict[str, float]]
    captions: dict[str, list[dict[str, Any]]]
    references: list[str]
    info: dict[str, Any]

    @property
    def fact_metrics(self) -> list[str]:
        return [k for k in (f"{kind}_{m}" for kind in (*FACT_KINDS, "all") for m in ("precision", "recall"))
                if any(k in s for s in self.summary.values())]

    def to_markdown(self) -> str:
        nll = sorted({k for v in self.summary.values() for k in v if k.startswith("reference_nll")})
        cols = ["model", *self.fact_metrics, "unparsed_sentences", *nll]
        return markdown_table([{"model": m, **self.summary[m]} for m in self.models], cols, digits=2)

    def save(self, out: str | os.PathLike, plots: bool = True) -> dict[str, str]:
        """``retention.csv`` (summary per model), ``retention_captions.csv`` (every caption), ``retention.json``,
        ``retention.md`` and ``retention.png``."""
        out = Path(out)
        rows = [{"model": m, **self.summary[m]} for m in self.models]
        per_caption = [{"model": m, **c} for m in self.models for c in self.captions[m]]
        files = {"csv": write_csv(out / "retention.csv", rows),
                 "captions_csv": write_csv(out / "retention_captions.csv", per_caption),
                 "json": write_json(out / "retention.json", {"models": self.models, "summary": self.summary,
                                                             "captions": self.captions,
                                                             "references": self.references, "info": self.info}),
                 "md": write_text(out / "retention.md", self.to_markdown() + "\n")}
        if plots:
            from .plots import plot_retention

            files["png"] = plot_retention(self, out / "retention.png")
        return {k: str(v) for k, v in files.items()}


@torch.no_grad()
def _reference_nll(model, runner, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, nll, count = runner.image_features_and_ar(pixels.to(model.device), ids.to(model.device))
    return nll.cpu(), count.cpu()


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def caption_retention(models: Mapping[str, tuple[torch.nn.Module, Callable]], scenes: Scenes,
                      config: RetentionConfig | None = None) -> RetentionResult:
    """Caption ``scenes`` with every model, score the captions and the reference NLLs.

    Args:
        models: label -> (VladVA model, preprocess), e.g. base / VladVA fine-tune / contrastive-only fine-tune.
        scenes: from :func:`world_scenes` (fact scores) or any images with reference captions (NLL only).
    """
    if not models:
        raise ValueError("no models given")
    cfg = config or RetentionConfig()
    summary: dict[str, dict[str, float]] = {}
    captions: dict[str, list[dict[str, Any]]] = {}
    for label, (model, preprocess) in models.items():
        _lvlm.require_vladva(model, f"caption retention ({label})")
        model.eval()
        instructed = _lvlm.prompt_view(model, image_prompt=cfg.instruction)
        records: list[dict[str, Any]] = []
        nll = {key: [0.0, 0.0] for key in ("instruction", "own", *scenes.extra_references)}
        n = len(scenes.images)
        for start in tqdm(range(0, n, cfg.batch_size), desc=f"captions ({label})", disable=not cfg.progress):
            stop = min(n, start + cfg.batch_size)
            pixels = torch.stack([preprocess(im) for im in scenes.images[start:stop]])
            texts = model.generate(pixels.to(model.device), cfg.instruction, max_new_tokens=cfg.max_new_tokens)
            # As next-token targets the references are tokenized as the answer after the prompt (what the AR loss
            # and the captioner's pretraining see), not as captions inside a template.
            runs = [("instruction", instructed, scenes.references), ("own", model, scenes.references)]
            runs += [(name, instructed, refs) for name, refs in scenes.extra_references.items()]
            for key, runner, refs in runs:
                ids = model.tokenizer.long_captions(refs[start:stop], context_length=cfg.max_caption_len)
                s, c = _reference_nll(model, runner, pixels, ids)
                nll[key][0] += float(s.sum())
                nll[key][1] += float(c.sum())
            for k, text in enumerate(texts):
                i = start + k
                rec: dict[str, Any] = {"key": scenes.keys[i], "generated": text.strip()}
                if scenes.scenes is not None:
                    facts = caption_facts(text, scenes.world_config)
                    scores = fact_scores(facts, scenes.scenes[i])
                    rec["unparsed_sentences"] = facts.unparsed
                    for kind, s in scores.items():
                        rec[f"{kind}_precision"] = s["precision"]
                        rec[f"{kind}_recall"] = s["recall"]
                records.append(rec)
        captions[label] = records
        s: dict[str, float] = {}
        if scenes.scenes is not None:
            for kind in (*FACT_KINDS, "all"):
                for m in ("precision", "recall"):
                    s[f"{kind}_{m}"] = _mean([r[f"{kind}_{m}"] for r in records])
            s["unparsed_sentences"] = sum(r["unparsed_sentences"] for r in records) / len(records)
        s["reference_nll"] = nll["instruction"][0] / max(nll["instruction"][1], 1.0)
        s["reference_nll_own_prompt"] = nll["own"][0] / max(nll["own"][1], 1.0)
        for name in scenes.extra_references:
            s[f"reference_nll_{name}"] = nll[name][0] / max(nll[name][1], 1.0)
        s["mean_words"] = sum(len(r["generated"].split()) for r in records) / len(records)
        summary[label] = s
    info = {"instruction": cfg.instruction, "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy",
            "scenes": scenes.info, "fact_scores": scenes.scenes is not None,
            "nll": "mean next-token NLL (nats) per reference caption token, EOS included",
            "averaging": "fact precision/recall: mean over captions of the per-caption percentages (a caption "
                         "stating no fact has no precision)"}
    return RetentionResult(list(models), summary, captions, list(scenes.references), info)
