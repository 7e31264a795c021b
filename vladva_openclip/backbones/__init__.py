"""LVLM families. Importing this package registers every built-in family."""
from . import llava, qwen2vl  # noqa: F401  (registration side effect)
from .base import BACKBONES, Backbone, WeightsNotFoundError, get_backbone, register_backbone

__all__ = ["BACKBONES", "Backbone", "WeightsNotFoundError", "get_backbone", "register_backbone"]
