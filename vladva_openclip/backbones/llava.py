"""LLaVA-1.5 (CLIP ViT-L/14-336 + MLP projector + Vicuna/Llama): 576 image tokens at 336 px."""
from __future__ import annotations

import torch
from torch import nn

from .base import Backbone, register_backbone


@register_backbone
class LlavaBackbone(Backbone):
    name = "llava"
    model_class_name = "LlavaForConditionalGeneration"
    model_types = ("llava",)

    def frozen_towers(self, lvlm: nn.Module) -> list[nn.Module]:
        return [lvlm.model.vision_tower, lvlm.model.multi_modal_projector]

    def architecture(self, config) -> dict:
        # CLIP's position embeddings fix the input size: the checkpoint decides it, not the registered config.
        return {"image_size": int(config.vision_config.image_size)}

    def image_token_id(self, config) -> int:
        return int(config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index)

    def _patch(self, config) -> int:
        return int(config.vision_config.patch_size)

    def check_image_size(self, config, image_size: int) -> None:
        expected = int(config.vision_config.image_size)
        if image_size != expected:
            raise ValueError(
                f"LLaVA's CLIP vision tower was built for {expected}x{expected} images (position embeddings are "
                f"fixed), got {image_size}; use the model's own preprocess transform"
            )

    def num_image_tokens(self, config, image_size: int) -> int:
        n = (image_size // self._patch(config)) ** 2
        # "default" drops CLS; "full" keeps it.
        return n if config.vision_feature_select_strategy == "default" else n + 1

    def image_features(self, lvlm: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        out = lvlm.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

    def generation_inputs(self, lvlm, ids, mask, pixels):
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
