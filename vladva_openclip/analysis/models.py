"""Which models an analysis compares: ``LABEL=NAME[:PRETRAINED]`` references, built through open_clip."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _lvlm

__all__ = ["ModelBuildError", "ModelRef", "load_models", "load_vladva", "parse_model_ref"]

_logger = logging.getLogger(__name__)

#: open_clip precisions that make sense for analysis (weights cast at build time; no autocast)
PRECISIONS = ("fp32", "bf16", "fp16")


class ModelBuildError(ValueError):
    """A model reference could not be built (unknown name, a checkpoint of another model, missing weights)."""


@dataclass(frozen=True)
class ModelRef:
    """A model to analyse.

    Attributes:
        label: how tables and figures name it (e.g. ``before``, ``VladVA``).
        name: a registered VladVA model name.
        pretrained: a tag, adapter directory, ``.safetensors`` or ``.pt`` checkpoint (None: the config's base).
        kwargs: ``create_model`` keywords (e.g. ``use_lora=False`` for a checkpoint trained without LoRA).
    """

    label: str
    name: str
    pretrained: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_model_ref(text: str) -> ModelRef:
    """``"[LABEL=]NAME[:PRETRAINED]"``; the label defaults to ``NAME`` or ``NAME:PRETRAINED``."""
    from ..eval.api import parse_model_spec

    label, sep, spec = text.partition("=")
    if not sep:
        label, spec = "", text
    if sep and not label:
        raise ValueError(f"bad model reference {text!r}: empty label before '='")
    parsed = parse_model_spec(spec)
    return ModelRef(label or spec, parsed.name, parsed.pretrained)


def load_vladva(ref: ModelRef, device: str | torch.device = "cpu",
                precision: str = "fp32") -> tuple[torch.nn.Module, Callable]:
    """(model in eval mode, its val preprocess). Errors name the model and what to change."""
    import open_clip

    import vladva_openclip  # registers the VladVA models (also used below)

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if ref.name not in vladva_openclip.list_vladva_models():
        raise ModelBuildError(f"model {ref.label!r}: {ref.name!r} is not a VladVA model; the analyses need an LVLM's "
                         f"language-model head. Registered: {', '.join(vladva_openclip.list_vladva_models())}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            ref.name, pretrained=ref.pretrained, precision=precision, device=device, **ref.kwargs)
    except (ValueError, OSError, RuntimeError, TypeError) as err:
        raise ModelBuildError(f"cannot build model {ref.label!r} ({ref.name}, pretrained={ref.pretrained!r}): "
                              f"{type(err).__name__}: {err}") from err
    _lvlm.require_vladva(model, f"model {ref.label!r}")
    return model.eval(), preprocess


def load_models(refs: Sequence[ModelRef], device: str | torch.device = "cpu",
                precision: str = "fp32") -> dict[str, tuple[torch.nn.Module, Callable]]:
    """Build every reference (labels must be distinct), in order."""
    labels = [r.label for r in refs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"several models are labelled {dupes}; give each a distinct LABEL=")
    if not refs:
        raise ValueError("no models given")
    out = {}
    for ref in refs:
        _logger.info("building %s (%s, pretrained=%s)", ref.label, ref.name, ref.pretrained)
        out[ref.label] = load_vladva(ref, device, precision)
    return out
