"""Captioners behind one interface: ``vladva`` (model.generate), ``hf`` (transformers), ``vllm``; the registry
is filled by importing the backend modules here."""
from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from . import hf, vladva, vllm  # noqa: F401  (registration)
from .base import BACKENDS, BackendUnavailable, Captioner, Generation, register_backend

if TYPE_CHECKING:
    from ..config import CaptionJobConfig

__all__ = ["BACKENDS", "BackendUnavailable", "Captioner", "Generation", "build_captioner", "register_backend",
           "resolve_backend"]

_logger = logging.getLogger(__name__)


def vllm_usable() -> bool:
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def resolve_backend(config: CaptionJobConfig) -> str:
    """``auto``: vLLM for a transformers directory when vLLM and a GPU are there, else ``hf``; a VladVA model
    name without ``hf_model``: ``vladva``."""
    if config.backend != "auto":
        if config.backend not in BACKENDS:
            raise ValueError(f"unknown caption backend {config.backend!r}; choose from {['auto', *BACKENDS]}")
        return config.backend
    if config.hf_model:
        return "vllm" if vllm_usable() else "hf"
    if config.model:
        return "vladva"
    raise ValueError("no captioner: give --model NAME [--pretrained TAG] (a VladVA model's own base) or "
                     "--hf-model DIR (a transformers image-text-to-text checkpoint)")


def build_captioner(config: CaptionJobConfig, ctx: Any) -> Captioner:
    """The registered backend for ``config`` (``ctx``: the job's DistContext, for the device)."""
    name = resolve_backend(config)
    _logger.info("caption backend: %s", name)
    return BACKENDS[name](config, ctx)
