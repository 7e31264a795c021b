"""Captioners behind one interface: ``vladva`` (model.generate), ``hf`` (transformers), ``vllm``."""
from .base import BACKENDS, BackendUnavailable, Captioner, Generation, build_captioner, register_backend, resolve_backend
from . import hf, vladva, vllm  # noqa: E402,F401  (registration)

__all__ = ["BACKENDS", "BackendUnavailable", "Captioner", "Generation", "build_captioner", "register_backend",
           "resolve_backend"]
