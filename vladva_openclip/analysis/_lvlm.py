"""The analyses' one seam with the VladVA model's internals.

Everything else in :mod:`vladva_openclip.analysis` uses the model's public surface (``encode_image``,
``encode_text``, ``generate``, ``image_features_and_ar``, ``cfg``, ``tokenizer``, ``lvlm``). What needs more is
here, so that a change of how the model assembles its sequences is absorbed in this file:

- :func:`prompt_view`: the same weights with other handcrafted prompts (a second ``VladVA`` wrapper sharing the
  LVLM, LoRA included), so a prompt sweep never reloads a model;
- :func:`image_input_ids`: the image tower's token ids (``model.image_input_ids()``) on the model's device;
- :func:`encode_images_with_prompts`: image embeddings for many prompts that run the vision tower and projector
  once and the shared ``[template | image tokens]`` prefix of the LLM once (its key/value cache is reused), then
  only each prompt's own tokens;
- :func:`eager_attention` / :func:`summary_attention`: attention weights of the summary token (sdpa returns none),
  with the attention implementation restored afterwards.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = [
    "SummaryAttention",
    "eager_attention",
    "encode_images_with_prompts",
    "image_features",
    "image_input_ids",
    "image_token_positions",
    "is_vladva",
    "prompt_view",
    "summary_attention",
    "summary_logits",
]


def is_vladva(model: object) -> bool:
    """Whether ``model`` is a VladVA model (an LVLM with an LM head), not e.g. an open_clip CLIP."""
    from ..model import VladVA

    return isinstance(model, VladVA)


def require_vladva(model: object, what: str) -> None:
    if not is_vladva(model):
        raise TypeError(f"{what} needs a VladVA model (an LVLM with a language-model head); got "
                        f"{type(model).__name__}. Build one with open_clip.create_model('vladva-...')")


# ---- logits at the summary position ------------------------------------------------------------------------
def summary_logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the summary position.

    The embedding *is* the final-layer hidden state of the summary token (no projection head), so the LM head
    applied to the unnormalised embedding gives exactly what the LVLM would predict next.

    Args:
        features: ``[B, D]`` from ``encode_image``/``encode_text`` with ``normalize=False``.

    Returns:
        ``[B, V]`` fp32.
    """
    head = model.backbone.lm_head(model.lvlm)
    return head(features.to(device=head.weight.device, dtype=head.weight.dtype)).float()


# ---- prompt views ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _grad_flags_kept(module: nn.Module) -> Iterator[None]:
    """Building a wrapper freezes the LVLM it wraps; the analysed model's own flags must not change."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def prompt_view(model: nn.Module, image_prompt: str | None = None, text_prompt: str | None = None,
                keep_modes: bool = False) -> nn.Module:
    """The model with other prompts: a new ``VladVA`` around the *same* LVLM object (LoRA and all), so nothing
    is copied or reloaded. Trained soft prompts are not carried over (they belong to the prompt they were trained
    from); a view is what the model with these prompts computes before any soft prompt is trained.

    Args:
        image_prompt, text_prompt: the prompts (None keeps the model's prompt text).
        keep_modes: keep the model's prompt modes (a soft prompt is then freshly initialised from the text);
            default: handcrafted prompts.

    Returns:
        A VladVA model in the analysed model's mode, on its device.
    """
    from ..model import VladVA

    require_vladva(model, "a prompt view")
    changes = {} if keep_modes else {"image_prompt.mode": "handcrafted", "text_prompt.mode": "handcrafted"}
    if image_prompt is not None:
        changes["image_prompt.text"] = image_prompt
    if text_prompt is not None:
        changes["text_prompt.text"] = text_prompt
    cfg = model.cfg.replace(**changes) if changes else model.cfg
    with _grad_flags_kept(model.lvlm):
        view = VladVA(cfg, model.lvlm, model.tokenizer, name=model.model_name)
    view.tokenizer = model.tokenizer
    if hasattr(model, "lora_config"):  # the LoRA layers live in the shared LVLM; saving an adapter needs this
        view.lora_config = model.lora_config
    with torch.no_grad():
        view.logit_scale.copy_(model.logit_scale.detach())
    view.logit_scale.requires_grad_(False)
    view.output_dict = model.output_dict
    return view.to(model.device).train(model.training)


# ---- token layout of the image tower -----------------------------------------------------------------------
def image_input_ids(model: nn.Module) -> torch.Tensor:
    """Token ids of the image tower's sequence ``[template | image tokens | prompt]``, ``[T]``, on the model's
    device (soft-prompt slots hold the handcrafted ids they were initialised from)."""
    return model.image_input_ids().to(model.device)


def image_token_id(model: nn.Module) -> int:
    return int(model.backbone.image_token_id(model.lvlm.config))


def image_token_positions(model: nn.Module) -> torch.Tensor:
    """Positions of the image tokens in the image tower's sequence, ``[N]`` (in the vision encoder's order)."""
    return (image_input_ids(model) == image_token_id(model)).nonzero().flatten()


def image_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Vision tower + projector: ``[B, 3, S, S]`` -> ``[B, N, H]`` in the base dtype (what fills the image slots)."""
    pixels = model._check_image(pixels)
    return model.backbone.image_features(model.lvlm, pixels).to(model.base_dtype)


# ---- many prompts, one vision pass ------------------------------------------------------------------------
def _new_cache(lm: nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=lm.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _cache_kwarg(lm: nn.Module) -> str:
    # transformers renamed ``past_key_values`` to ``cache`` in the 5.x series; accept either.
    params = inspect.signature(lm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _common_prefix(rows: Sequence[torch.Tensor]) -> int:
    n = min(int(r.numel()) for r in rows)
    first = rows[0][:n]
    same = torch.ones(n, dtype=torch.bool, device=first.device)
    for r in rows[1:]:
        same &= r[:n] == first
    diff = (~same).nonzero()
    return int(diff[0, 0]) if diff.numel() else n


@torch.no_grad()
def encode_images_with_prompts(model: nn.Module, views: Sequence[nn.Module], pixels: torch.Tensor,
                               reuse: bool = True) -> list[torch.Tensor]:
    """Image embeddings of one batch under several prompt views of ``model``.

    The vision tower and projector run once; the LLM runs once over the prefix all views share (template and
    image tokens; with ``reuse``) and keeps its key/value cache, then each view runs only its remaining tokens.
    With causal attention this equals ``view.encode_image(pixels)`` (up to float rounding; tested).

    Args:
        views: from :func:`prompt_view` (handcrafted prompts: every input embedding follows from the ids).
        pixels: ``[B, 3, S, S]`` preprocessed images.
        reuse: False runs every view's whole sequence (the reference path).

    Returns:
        One ``[B, D]`` unnormalised embedding per view (fp32).
    """
    if not views:
        return []
    pixels = model._check_image(pixels)
    backbone = model.backbone
    if backbone.variable_image_tokens and not (backbone.dynamic_resolution and isinstance(pixels, torch.Tensor)):
        # Each image has its own number of image tokens (LLaVA-NeXT; Qwen images of several sizes): no prefix is
        # shared across a batch, so every view runs its own encode_image (the reference path). A Qwen batch of one
        # size shares its prefix like any fixed-count family.
        return [v.encode_image(pixels).float() for v in views]
    vision = backbone.vision(model.lvlm, pixels)
    feats = vision.tokens.to(model.base_dtype)
    b = pixels.shape[0]
    size = tuple(pixels.shape[-2:])
    emb = model.embedding
    img_id = image_token_id(model)
    lm = model.language_model
    ids = [v.image_input_ids(size).to(model.device) for v in views]
    last_image = int((ids[0] == img_id).nonzero().max())
    prefix = min(_common_prefix(ids), min(int(r.numel()) for r in ids) - 1)
    if not reuse or prefix <= last_image:
        prefix = 0  # nothing worth sharing: every view runs in full

    def embeds(row: torch.Tensor) -> torch.Tensor:
        x = emb(row).unsqueeze(0).expand(b, -1, -1)
        slots = (row == img_id).view(1, -1, 1).expand_as(x)
        return x.masked_scatter(slots, feats) if bool(slots.any()) else x

    def positions(row: torch.Tensor) -> torch.Tensor | None:
        full = row.unsqueeze(0).expand(b, -1)
        return model.backbone.position_ids(model.lvlm, full, torch.ones_like(full), size)

    def injected(row: torch.Tensor) -> dict:
        """Per-layer vision features (Qwen3-VL's DeepStack) for a pass over ``row``, which holds the image."""
        slots = (row == img_id).unsqueeze(0).expand(b, -1)
        return model.backbone.injection_kwargs(vision.layer_tokens, slots)

    def sl(pos: torch.Tensor | None, start: int, stop: int | None = None) -> torch.Tensor | None:
        return None if pos is None else pos[..., start:stop]

    out: list[torch.Tensor] = []
    if prefix == 0:
        for row in ids:
            mask = torch.ones(b, row.numel(), dtype=torch.long, device=row.device)
            hidden = lm(inputs_embeds=embeds(row), attention_mask=mask, position_ids=positions(row),
                        use_cache=False, **injected(row)).last_hidden_state
            out.append(hidden[:, -1].float())
        return out

    key = _cache_kwarg(lm)
    cache = _new_cache(lm)
    head = ids[0][:prefix]
    mask = torch.ones(b, prefix, dtype=torch.long, device=head.device)
    pos0 = positions(ids[0])
    # The shared prefix holds every image token (prefix > last_image), so the tails need no injection.
    lm(inputs_embeds=embeds(head), attention_mask=mask, position_ids=sl(pos0, 0, prefix), use_cache=True,
       **{key: cache}, **injected(head))
    for row in ids:
        tail = row[prefix:]
        full_mask = torch.ones(b, row.numel(), dtype=torch.long, device=row.device)
        hidden = lm(inputs_embeds=emb(tail).unsqueeze(0).expand(b, -1, -1), attention_mask=full_mask,
                    position_ids=sl(positions(row), prefix), use_cache=True, **{key: cache}).last_hidden_state
        out.append(hidden[:, -1].float())
        cache.crop(-int(tail.numel()))  # back to the shared prefix for the next view
    return out


# ---- attention ---------------------------------------------------------------------------------------------
def _attn_implementations(lvlm: nn.Module) -> dict[str, str]:
    cfg = lvlm.config
    impls = {"": cfg._attn_implementation}
    for key in cfg.sub_configs:
        sub = getattr(cfg, key, None)
        if sub is not None:
            impls[key] = sub._attn_implementation
    return impls


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run the LLM with eager attention (the only implementation that returns weights) inside the block; the
    previous implementation of every sub-model is restored afterwards, also on error."""
    lvlm = model.lvlm
    before = _attn_implementations(lvlm)
    text_key = "text_config" if "text_config" in before else ""
    if before[text_key] == "eager":
        yield
        return
    lvlm.set_attn_implementation({text_key: "eager"} if text_key else "eager")
    try:
        yield
    finally:
        lvlm.set_attn_implementation(before)
        if _attn_implementations(lvlm) != before:  # never leave the model silently changed
            raise RuntimeError(f"could not restore the attention implementation {before}; "
                               f"now {_attn_implementations(lvlm)}")


@dataclass
class SummaryAttention:
    """Attention of the summary token in every LLM layer.

    Attributes:
        weights: ``[B, L, H, T]`` fp32, softmax weights of the last valid query position over all key positions.
        lengths: ``[B]`` valid length of each row (the summary token is at ``lengths - 1``).
    """

    weights: torch.Tensor
    lengths: torch.Tensor


@contextlib.contextmanager
def summary_attention(model: nn.Module) -> Iterator[list[SummaryAttention]]:
    """Inside the block, every language-model call (e.g. from ``model.encode_image``) appends the summary token's
    attention weights to the yielded list. Only the summary row is kept, so memory stays ``O(L * H * T)`` per
    sample beyond what transformers itself materialises for one forward."""
    lm = model.language_model
    records: list[SummaryAttention] = []

    def pre(module, args, kwargs):
        return args, {**kwargs, "output_attentions": True}

    def post(module, args, kwargs, output):
        atts = getattr(output, "attentions", None)
        if not atts:
            raise RuntimeError("the language model returned no attention weights; is its attention eager?")
        mask = kwargs.get("attention_mask")
        b, t = atts[0].shape[0], atts[0].shape[-1]
        lengths = (mask.sum(1).long() if mask is not None
                   else torch.full((b,), t, dtype=torch.long, device=atts[0].device))
        rows = torch.arange(b, device=atts[0].device)
        stacked = torch.stack([a[rows, :, lengths - 1, :] for a in atts], dim=1)  # [B, L, H, T]
        records.append(SummaryAttention(stacked.detach().float().cpu(), lengths.cpu()))

    with eager_attention(model):
        h1 = lm.register_forward_pre_hook(pre, with_kwargs=True)
        h2 = lm.register_forward_hook(post, with_kwargs=True)
        try:
            yield records
        finally:
            h1.remove()
            h2.remove()
