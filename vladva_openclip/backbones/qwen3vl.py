"""Qwen3-VL: 16-px patches, and DeepStack.

The vision tower resamples its learned position grid to each image's grid and, besides the merged features that
fill the image slots, returns merged features of three intermediate blocks (``deepstack_visual_indexes``);
``Qwen3VLTextModel`` adds the i-th of them to the output of LLM layer i at the image positions
(``visual_pos_masks``, ``deepstack_visual_embeds``). Every pass over an image sequence must carry them, so the
backbone returns them from :meth:`vision` and turns them into the language model's keyword arguments.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import VisionOutput, register_backbone
from .qwen2vl import Qwen2VLBackbone


@register_backbone
class Qwen3VLBackbone(Qwen2VLBackbone):
    """Qwen3-VL: DeepStack features of intermediate vision blocks are added to the first LLM layers' outputs."""

    name = "qwen3vl"
    model_class_name = "Qwen3VLForConditionalGeneration"
    model_types = ("qwen3_vl",)

    def vision(self, lvlm: nn.Module, images) -> VisionOutput:
        out, counts = self._vision_call(lvlm, images)
        layers = [torch.cat(list(f)) if isinstance(f, (list, tuple)) else f for f in out.deepstack_features]
        return VisionOutput(torch.cat(list(out.pooler_output)), counts, layers)

    def injection_kwargs(self, layer_tokens: list[torch.Tensor], slots: torch.Tensor) -> dict[str, Any]:
        # Qwen3VLTextModel adds deepstack_visual_embeds[i] (rows in slot order) to layer i's output at the slots.
        if not layer_tokens:
            return {}
        return {"visual_pos_masks": slots, "deepstack_visual_embeds": layer_tokens}
