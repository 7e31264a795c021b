"""Random-weight VladVA models of real width and chosen LLM depth, random batches, and the FLOP count of a step.

Models are built through the public API, ``open_clip.create_model(name, base_model=None, tokenizer=...)``: no
base weights (random init, nothing downloaded) and a tokenizer shipped in the package (it only spells the chat
template; captions are random ids of exact lengths). The LLM depth has no ``create_model`` keyword, so a variant of
the registered config with ``text_config.num_hidden_layers`` changed is registered for the duration of the build
(:func:`registered_variant`). On CUDA the weights are created and initialised on the GPU (seconds instead of a
minute of CPU init for 1.4B parameters).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One model to measure.

    Attributes:
        label: name in the results (``"llava-1.5-7b"``).
        registered: the registered VladVA config it starts from.
        tokenizer: shipped tokenizer (``asset:<name>``) that spells the template.
        layers: LLM decoder layers to build (None: as registered).
        full_layers: the real model's depth, for the extrapolation.
    """

    label: str
    registered: str
    tokenizer: str
    layers: int | None
    full_layers: int


@dataclass
class StepShape:
    """Batch and caption lengths of a training step / inference run."""

    batch: int
    short_len: int
    long_len: int
    text_batch: int = 0  # inference: captions per encode_text call (0: same as batch)
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def registered_variant(base: str, layers: int | None) -> Iterator[str]:
    """Register ``base`` with its LLM cut to ``layers`` decoder layers under a temporary name; yields the name."""
    if layers is None:
        yield base
        return
    from vladva_openclip import registry

    cfg = registry.get_vladva_config(base)
    cfg["vladva_cfg"]["hf_config"]["text_config"]["num_hidden_layers"] = int(layers)
    name = f"{base}-gpucheck-{layers}l"
    table = registry._configs()  # the registry's parsed configs (a cached dict); removed again below
    table[name] = cfg
    try:
        yield name
    finally:
        table.pop(name, None)


def build(spec: ModelSpec, device: str, precision: str = "amp_bf16") -> tuple[nn.Module, dict[str, Any]]:
    """The model on ``device`` (bf16 base for ``amp_bf16``, fp32 LoRA/prompts) and how it was built."""
    import open_clip

    import vladva_openclip  # noqa: F401 - registers the vladva-* names with open_clip

    info: dict[str, Any] = {}
    start = time.time()
    with registered_variant(spec.registered, spec.layers) as name:
        kwargs = {"precision": precision, "device": device, "base_model": None, "tokenizer": spec.tokenizer}
        try:
            # Create (and randomly initialise) the weights directly on the device.
            with torch.device(device):
                model = open_clip.create_model(name, **kwargs)
            info["init_on"] = device
        except Exception as err:  # noqa: BLE001 - fall back to the plain (CPU-initialised) build
            _logger.warning("building %s under torch.device(%s) failed (%s); building on CPU", name, device, err)
            if device == "cuda":
                torch.cuda.empty_cache()
            model = open_clip.create_model(name, **kwargs)
            info["init_on"] = f"cpu (device build failed: {type(err).__name__}: {str(err)[:200]})"
    info["build_seconds"] = round(time.time() - start, 2)
    info["llm_layers"] = len(decoder_layers(model))
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, info


def decoder_layers(model) -> nn.ModuleList:
    return model.language_model.layers


def special_id_bounds(model) -> tuple[int, int]:
    """[lo, hi) of token ids safe for random captions: above the small special ids (tiny tokenizers) and below the
    large ones (image/vision/bos/eos ids of the real vocabularies), so no caption id is read as an image token."""
    cfg = model.lvlm.config
    ids = []
    for holder in (cfg, getattr(cfg, "text_config", None)):
        for key in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                    "vision_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(holder, key, None) if holder is not None else None
            if isinstance(value, int):
                ids.append(value)
    vocab = int(model.embedding.num_embeddings)
    lo = 16
    hi = min([v for v in ids if v >= lo] + [vocab])
    return lo, hi


def random_batch(model, shape: StepShape, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images ``[B, 3, S, S]``, packed captions ``[B, 2, L]``: row 0 short (padded), row 1 long), L = long_len."""
    gen = torch.Generator(device=device).manual_seed(seed)
    size = model.cfg.image_size
    images = torch.randn(shape.batch, 3, size, size, device=device, generator=gen)
    lo, hi = special_id_bounds(model)
    width = max(shape.long_len, shape.short_len)
    ids = torch.randint(lo, hi, (shape.batch, 2, width), device=device, generator=gen)
    ids[:, 0, shape.short_len:] = model.pad_token_id
    ids[:, 1, shape.long_len:] = model.pad_token_id
    return images, ids


def random_captions(model, batch: int, length: int, device: str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    lo, hi = special_id_bounds(model)
    return torch.randint(lo, hi, (batch, length), device=device, generator=gen)


class LLMCallRecorder:
    """Records ``(batch, tokens)`` of every language-model call (a forward pre-hook), for the FLOP count."""

    def __init__(self, model):
        self.calls: list[tuple[int, int]] = []
        self._handle = model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and args:
            embeds = args[0]
        if embeds is not None:
            self.calls.append((int(embeds.shape[0]), int(embeds.shape[1])))

    def remove(self) -> None:
        self._handle.remove()


def layer_matmul_params(model) -> int:
    """Weights of one LLM decoder layer used in matrix products (base linears; LoRA excluded)."""
    layer = decoder_layers(model)[0]
    return sum(m.in_features * m.out_features for name, m in layer.named_modules()
               if isinstance(m, nn.Linear) and "lora_" not in name)


def llm_dims(model) -> dict[str, int]:
    cfg = model.lvlm.config
    text = getattr(cfg, "text_config", cfg)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return {"hidden": int(text.hidden_size), "attn_width": heads * head_dim,
            "vocab": int(model.embedding.num_embeddings), "layer_params": layer_matmul_params(model)}


def vision_forward_flops(model, device: str) -> float:
    """FLOPs of the vision tower + projector for one image, counted with torch's FlopCounterMode (exact for what
    runs: patch embedding, every encoder layer, attention, projector)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.cfg.image_size
    pixels = torch.randn(1, 3, size, size, device=device, dtype=model.base_dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.backbone.image_features(model.lvlm, pixels)
    return float(counter.get_total_flops())


FLOP_FORMULA = (
    "model FLOPs per step = B * F_vision + sum over the step's LLM passes (batch B_p, T_p tokens, L layers) of "
    "[forward 2*B_p*T_p*P*L + 2*B_p*T_p^2*A*L] + [backward 2*B_p*T_p*P*L + 4*B_p*T_p^2*A*L] + 2 * 2*H*V*M; "
    "P = matmul weights of one decoder layer, A = heads*head_dim, attention counted causal (half of T^2), "
    "M = labelled caption tokens (lm_head forward + input-gradient backward), H = hidden size, V = vocabulary; "
    "F_vision = vision tower + projector forward of one image (frozen: no backward), counted by FlopCounterMode. "
    "The base is frozen, so backward computes input gradients only (1x the forward's matmuls; LoRA's rank-16 "
    "weight gradients are left out). Gradient-checkpoint recomputation is not model work: it is in the "
    "'hardware' figure (+ one LLM forward and one lm_head forward)."
)


def step_flops(dims: dict[str, int], calls: list[tuple[int, int]], layers: int, batch: int,
               labelled_tokens: int, vision_flops_per_image: float) -> dict[str, float]:
    """Model and hardware FLOPs of one training step (see :data:`FLOP_FORMULA`)."""
    p, a, h, v = dims["layer_params"], dims["attn_width"], dims["hidden"], dims["vocab"]
    fwd = sum(2.0 * b * t * p * layers + 2.0 * b * t * t * a * layers for b, t in calls)
    bwd = sum(2.0 * b * t * p * layers + 4.0 * b * t * t * a * layers for b, t in calls)
    head = 2.0 * h * v * labelled_tokens
    vision = batch * vision_flops_per_image
    model = vision + fwd + bwd + 2 * head
    return {"model": model, "hardware": model + fwd + head, "vision": vision, "llm_forward": fwd,
            "llm_backward": bwd, "lm_head": 2 * head}


def inference_flops(dims: dict[str, int], calls: list[tuple[int, int]], layers: int) -> float:
    """Forward FLOPs of the LLM calls of one encode_* call (the vision tower is added by the caller)."""
    p, a = dims["layer_params"], dims["attn_width"]
    return sum(2.0 * b * t * p * layers + 2.0 * b * t * t * a * layers for b, t in calls)


def linear_fit(points: dict[int, float], target: int) -> float | None:
    """Value at ``target`` layers of the line through the two deepest measured depths (None with fewer than 2)."""
    if len(points) < 2:
        return None
    (l1, y1), (l2, y2) = sorted(points.items())[-2:]
    slope = (y2 - y1) / (l2 - l1)
    return y2 + slope * (target - l2)


def increasing(points: dict[int, float]) -> bool:
    """Whether the two deepest measured depths take more time the deeper they are (a usable fit)."""
    if len(points) < 2:
        return False
    (_, y1), (_, y2) = sorted(points.items())[-2:]
    return y2 > y1
