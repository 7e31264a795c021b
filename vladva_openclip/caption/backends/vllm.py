"""``vllm``: a transformers checkpoint served by vLLM's offline engine, ``LLM.generate`` with one image per
prompt (``multi_modal_data``), one engine per GPU.

Under torchrun every rank builds its own engine on its own GPU; the job feeds each rank its own shards (vLLM's
``external_launcher`` data-parallel mode leaves load balancing to the caller). Untested on a real vLLM here
(no GPU was lent while this was written); the code around the engine call is tested with a stand-in engine.
"""
from __future__ import annotations

import importlib.util
from typing import Any

from ._hfdir import checkpoint_fingerprint, model_type, prompt_builder, resolve_path
from .base import BackendUnavailable, Captioner, Generation, keep_image, register_backend

__all__ = ["VLLMCaptioner", "engine_kwargs"]

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def engine_kwargs(path: str, precision: str, world_size: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM``: one image per prompt, no remote code, and torchrun's data-parallel
    launcher mode when several ranks each run an engine. ``extra`` (``--vllm-arg key=value``) wins."""
    kwargs: dict[str, Any] = {"model": path, "dtype": DTYPES[precision], "limit_mm_per_prompt": {"image": 1},
                              "trust_remote_code": False, "seed": 0}
    if world_size > 1:
        kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                      data_parallel_size=world_size)
    kwargs.update(extra)
    if kwargs.get("trust_remote_code"):
        raise ValueError("--vllm-arg trust_remote_code=true is refused: vladva caption never runs remote code")
    return kwargs


class VLLMCaptioner(Captioner):
    """``engine``: a ``vllm.LLM``; ``sampling_params``: ``vllm.SamplingParams`` (both injectable for tests)."""

    name = "vllm"

    def __init__(self, path: str, engine: Any, sampling_params: Any, processor: Any = None,
                 precision: str = "bf16"):
        self.path, self.engine, self.sampling_params = resolve_path(path), engine, sampling_params
        self.precision = precision
        if processor is None:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(self.path, trust_remote_code=False)
        self.processor = processor
        self.kind = model_type(self.path)
        self._prompt = prompt_builder(processor, self.kind)
        tok = processor.tokenizer
        self.eos_ids = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()

    def prepare(self, image) -> Any:
        return image  # vLLM's own processor resizes

    def image_transform(self):
        return keep_image

    def full_prompt(self, instruction: str) -> str:
        return self._prompt(instruction)

    def requests(self, images: list, instruction: str) -> list[dict[str, Any]]:
        prompt = self.full_prompt(instruction)
        return [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images]

    def sampling(self, settings) -> Any:
        if settings.no_repeat_ngram_size:
            raise ValueError("vLLM has no no-repeat n-gram option: use --repetition-penalty with --backend vllm, "
                             "or --backend hf")
        return self.sampling_params(temperature=settings.temperature, max_tokens=settings.max_new_tokens,
                                    repetition_penalty=settings.repetition_penalty, seed=settings.seed,
                                    skip_special_tokens=True)

    def generate(self, inputs: list, instruction: str, settings) -> list[Generation]:
        outputs = self.engine.generate(self.requests(inputs, instruction), self.sampling(settings), use_tqdm=False)
        if len(outputs) != len(inputs):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(inputs)} prompts")
        result = []
        for out in outputs:
            best = out.outputs[0]
            ids = list(best.token_ids)
            if best.finish_reason == "stop" and ids and ids[-1] in self.eos_ids:
                ids = ids[:-1]  # vLLM keeps the EOS id in token_ids (not in the text)
            reason = "length" if best.finish_reason == "length" else "stop"
            result.append(Generation(best.text, len(ids), reason))
        return result

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False).input_ids)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "name": self.path, "class": "vllm.LLM", "model_type": self.kind,
                "weights_fingerprint": checkpoint_fingerprint(self.path), "dtype": DTYPES[self.precision]}


@register_backend("vllm")
def build(config, ctx) -> VLLMCaptioner:
    if not config.hf_model:
        raise ValueError("--backend vllm needs --hf-model DIR (a checkpoint vLLM supports, e.g. llava-1.5-7b-hf)")
    if importlib.util.find_spec("vllm") is None:
        raise BackendUnavailable("--backend vllm needs vLLM, which is not installed (pip install vllm, on a CUDA "
                                 "machine); --backend hf runs the same checkpoint through transformers")
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("--backend vllm needs a CUDA GPU; use --backend hf on this machine")
    from vllm import LLM, SamplingParams

    precision = config.precision or "bf16"
    if precision not in DTYPES:
        raise ValueError(f"--precision {precision!r} for --backend vllm: choose from {sorted(DTYPES)}")
    engine = LLM(**engine_kwargs(resolve_path(config.hf_model), precision, ctx.world_size, config.vllm_args))
    return VLLMCaptioner(config.hf_model, engine, SamplingParams, precision=precision)
