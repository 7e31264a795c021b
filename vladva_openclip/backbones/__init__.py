"""LVLM families. Importing this package registers every built-in family."""
from . import llava, llava_next, qwen2vl, qwen3vl, qwen25vl  # noqa: F401  (registration side effect)
from .base import BACKBONES, Backbone, get_backbone, register_backbone
from .sources import BaseModelError, WeightsNotFoundError

__all__ = ["BACKBONES", "Backbone", "BaseModelError", "WeightsNotFoundError", "get_backbone", "register_backbone"]
