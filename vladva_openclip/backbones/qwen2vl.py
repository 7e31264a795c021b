"""Qwen2-VL: a fixed-size image tensor is cut into 14-px patches inside the model; M-RoPE 3-D positions."""
from __future__ import annotations

import torch
from torch import nn

from .base import Backbone, register_backbone


def patchify(pixels: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B,3,H,W]`` -> (flattened patches ``[B*gh*gw, 3*temporal*patch*patch]``, ``image_grid_thw [B,3]``).

    Same patch order as ``Qwen2VLImageProcessor`` (merge windows contiguous), with the still image repeated
    ``temporal`` times as the processor does for images.
    """
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B, gh/m, gw/m, m, m, C, p, p]
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    x = x.reshape(b * gh * gw, c * temporal * patch * patch)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=pixels.device)
    return x, grid


@register_backbone
class Qwen2VLBackbone(Backbone):
    name = "qwen2vl"
    model_class_name = "Qwen2VLForConditionalGeneration"
    model_types = ("qwen2_vl",)

    def frozen_towers(self, lvlm: nn.Module) -> list[nn.Module]:
        return [lvlm.model.visual]

    def image_token_id(self, config) -> int:
        return int(config.image_token_id)

    def _unit(self, config) -> int:
        return int(config.vision_config.patch_size) * int(config.vision_config.spatial_merge_size)

    def check_image_size(self, config, image_size: int) -> None:
        unit = self._unit(config)
        if image_size % unit:
            raise ValueError(f"Qwen2-VL image sides must be a multiple of {unit}, got {image_size}")

    def num_image_tokens(self, config, image_size: int) -> int:
        return (image_size // self._unit(config)) ** 2

    def image_body_ids(self, config, image_size: int) -> list[int]:
        body = super().image_body_ids(config, image_size)
        return [int(config.vision_start_token_id), *body, int(config.vision_end_token_id)]

    def _patchify(self, config, pixels):
        vc = config.vision_config
        return patchify(pixels, int(vc.patch_size), int(vc.temporal_patch_size), int(vc.spatial_merge_size))

    def image_features(self, lvlm: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        flat, grid = self._patchify(lvlm.config, pixels)
        feats = lvlm.model.get_image_features(pixel_values=flat, image_grid_thw=grid, return_dict=True).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return feats.reshape(pixels.shape[0], -1, feats.shape[-1])

    def position_ids(self, lvlm, ids, mask, image_size):
        if image_size is None:
            return None  # text only: arange on all three axes equals 1-D RoPE
        types = (ids == self.image_token_id(lvlm.config)).int()
        side = image_size // int(lvlm.config.vision_config.patch_size)
        grid = torch.tensor([[1, side, side]] * ids.shape[0], dtype=torch.long, device=ids.device)
        # Computed here, never left to Qwen2VLModel.forward, whose rope_deltas cache is stateful.
        pos, _ = lvlm.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=mask)
        return pos

    def generation_inputs(self, lvlm, ids, mask, pixels):
        flat, grid = self._patchify(lvlm.config, pixels)
        types = (ids == self.image_token_id(lvlm.config)).int()
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": flat, "image_grid_thw": grid,
                "mm_token_type_ids": types}
