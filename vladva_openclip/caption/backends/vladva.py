"""``vladva``: a VladVA model's own base LVLM captions through :meth:`VladVA.generate_tokens` (adapters active),
e.g. the shipped tiny captioner ``--model vladva-tiny-llava --pretrained synth_captioner``."""
from __future__ import annotations

from typing import Any

import torch

from .base import Captioner, Generation, device_and_precision, register_backend

__all__ = ["VladVACaptioner"]


def _cut_at_eos(row: list[int], eos: int) -> tuple[list[int], str]:
    """Generated ids up to (without) the first EOS, and the finish reason."""
    if eos in row:
        return row[:row.index(eos)], "stop"
    return row, "length"


class VladVACaptioner(Captioner):
    """Wraps a built VladVA model with its val transform and tokenizer."""

    name = "vladva"

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, label: str | None = None):
        if not hasattr(model, "generate_tokens"):
            raise ValueError(f"{type(model).__name__} is not a VladVA model (no generate_tokens); the vladva "
                             "caption backend needs a vladva-* model name, or use --backend hf with --hf-model")
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.label = label or getattr(model, "name", type(model).__name__)
        self._fingerprint: str | None = None

    def prepare(self, image) -> torch.Tensor:
        return self.preprocess(image)

    def image_transform(self):
        return self.preprocess

    def full_prompt(self, instruction: str) -> str:
        # the template's whole-string tokenization, image tokens included, decoded with its special tokens
        ids = self.model._image_split(self.tokenizer, instruction).ids
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @torch.no_grad()
    def generate(self, inputs: list[torch.Tensor], instruction: str, settings) -> list[Generation]:
        """inputs: ``[3, S, S]`` preprocessed images; one left-padded batch through ``generate_tokens``."""
        pixels = torch.stack(inputs).to(self.model.device, dtype=self.model.base_dtype)
        kwargs: dict[str, Any] = {"repetition_penalty": settings.repetition_penalty}
        if settings.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
        if not settings.greedy:
            torch.manual_seed(settings.seed)
            kwargs.update(do_sample=True, temperature=settings.temperature)
        new = self.model.generate_tokens(pixels, instruction, self.tokenizer, settings.max_new_tokens, **kwargs)
        out = []
        for row in new.tolist():
            ids, reason = _cut_at_eos(row, self.tokenizer.eos_token_id)
            out.append(Generation(self.tokenizer.decode(ids), len(ids), reason))
        return out

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def describe(self) -> dict[str, Any]:
        if self._fingerprint is None:
            from ...eval.cache import weights_fingerprint

            self._fingerprint = weights_fingerprint(self.model)
        return {"backend": self.name, "name": self.label, "class": type(self.model).__name__,
                "weights_fingerprint": self._fingerprint, "dtype": str(self.model.base_dtype)}


@register_backend("vladva")
def build(config, ctx) -> VladVACaptioner:
    from ...eval.api import ModelSpec, load_model

    if not config.model:
        raise ValueError("--backend vladva needs --model (a vladva-* model name) and usually --pretrained")
    device, precision = device_and_precision(config, ctx)
    spec = ModelSpec(config.model, config.pretrained)
    model, preprocess, tokenizer = load_model(spec, device=device, precision=precision)
    return VladVACaptioner(model, preprocess, tokenizer, label=spec.label)
