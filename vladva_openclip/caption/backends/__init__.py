"""Captioners behind one interface: ``vladva`` (model.generate), ``hf`` (transformers), ``vllm``."""
from . import hf, vladva, vllm  # noqa: F401  (registration)
from .base import (
    BACKENDS,
    BackendUnavailable,
    Captioner,
    Generation,
    build_captioner,
    register_backend,
    resolve_backend,
)

__all__ = ["BACKENDS", "BackendUnavailable", "Captioner", "Generation", "build_captioner", "register_backend",
           "resolve_backend"]
