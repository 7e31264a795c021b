"""Qwen2.5-VL: Qwen2-VL's interface; the differences live inside transformers' own classes.

Its vision tower attends within 112-px windows in most blocks (full attention in ``fullatt_block_indexes``) and
uses a SwiGLU MLP; ``get_image_features`` takes the same flat patches and grid as Qwen2-VL's and returns the
features in the same (merge-window) order. ``get_rope_index`` scales the temporal axis by ``tokens_per_second``
for videos only, so a still image's positions are Qwen2-VL's.
"""
from __future__ import annotations

from .base import register_backbone
from .qwen2vl import Qwen2VLBackbone


@register_backbone
class Qwen25VLBackbone(Qwen2VLBackbone):
    """Qwen2.5-VL: the window attention and SwiGLU of its vision tower live inside ``get_image_features``; the
    image's M-RoPE index is Qwen2-VL's (temporal scaling applies to videos only)."""

    name = "qwen25vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    model_types = ("qwen2_5_vl",)
