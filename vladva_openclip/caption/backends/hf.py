"""``hf``: any transformers image-text-to-text checkpoint (LLaVA-1.5, Qwen2-VL, ...) from a local directory or the
hub cache, through ``AutoProcessor`` + ``AutoModelForImageTextToText.generate``. Batches are left-padded (the
processor's tokenizer is switched to left padding), bf16 on GPU, fp32 on CPU. Remote code is never run."""
from __future__ import annotations

from typing import Any

import torch

from ._hfdir import checkpoint_fingerprint, model_type, prompt_builder, resolve_path
from .base import Captioner, Generation, device_and_precision, keep_image, register_backend

__all__ = ["HFCaptioner"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cut_at_eos(row: list[int], eos_ids: set[int]) -> tuple[list[int], str]:
    """Generated ids up to (without) the first end-of-sequence id, and the finish reason."""
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[:i], "stop"
    return row, "length"


class HFCaptioner(Captioner):
    name = "hf"

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, model=None, processor=None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.path = resolve_path(path)
        self.processor = processor or AutoProcessor.from_pretrained(self.path, trust_remote_code=False)
        # generation appends at the right end of every row: the prompts must be padded on the left
        self.processor.tokenizer.padding_side = "left"
        self.model = (model or AutoModelForImageTextToText.from_pretrained(
            self.path, dtype=dtype, trust_remote_code=False)).to(device).eval()
        self.device, self.dtype = device, dtype
        self.kind = model_type(self.path) or getattr(self.model.config, "model_type", None)
        self._prompt = prompt_builder(self.processor, self.kind)
        tok = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        if tok.eos_token_id is not None:
            self.eos_ids.add(int(tok.eos_token_id))
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos_ids)

    def prepare(self, image) -> Any:
        return image  # the processor resizes in the main process, batched

    def image_transform(self):
        return keep_image

    def full_prompt(self, instruction: str) -> str:
        return self._prompt(instruction)

    def batch_inputs(self, images: list, instruction: str):
        """The processor's left-padded batch for ``images`` with one instruction."""
        text = [self.full_prompt(instruction)] * len(images)
        return self.processor(images=images, text=text, padding=True, return_tensors="pt")

    @torch.no_grad()
    def generate(self, inputs: list, instruction: str, settings) -> list[Generation]:
        batch = self.batch_inputs(inputs, instruction).to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": self.pad_id,
                                  "repetition_penalty": settings.repetition_penalty}
        if settings.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            torch.manual_seed(settings.seed)
            kwargs.update(do_sample=True, temperature=settings.temperature)
        out = self.model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        result = []
        for row in new:
            ids, reason = cut_at_eos(row, self.eos_ids)
            result.append(Generation(self.processor.tokenizer.decode(ids, skip_special_tokens=True), len(ids),
                                     reason))
        return result

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False).input_ids)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "name": self.path, "class": type(self.model).__name__,
                "model_type": self.kind, "weights_fingerprint": checkpoint_fingerprint(self.path),
                "dtype": str(self.dtype).replace("torch.", "")}


@register_backend("hf")
def build(config, ctx) -> HFCaptioner:
    if not config.hf_model:
        raise ValueError("--backend hf needs --hf-model DIR (a transformers image-text-to-text checkpoint)")
    device, precision = device_and_precision(config, ctx)
    if precision not in DTYPES:
        raise ValueError(f"--precision {precision!r} for --backend hf: choose from {sorted(DTYPES)}")
    return HFCaptioner(config.hf_model, device, DTYPES[precision])
