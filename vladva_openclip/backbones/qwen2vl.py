"""Qwen2-VL, and what the Qwen-VL families share (Qwen2.5-VL and Qwen3-VL subclass it).

All three cut the image into ``patch``-px patches inside the model (a still image is repeated over the temporal
patch), merge ``merge x merge`` patches into one LLM token and place text and image tokens with M-RoPE 3-D
positions. They differ where transformers' own classes differ, and nowhere else here:

- Qwen2-VL: 14-px patches, one full-attention vision tower.
- Qwen2.5-VL: 14-px patches, windowed attention in most vision blocks (inside the tower: the same call), SwiGLU
  vision MLP; the M-RoPE index of a still image is Qwen2-VL's.
- Qwen3-VL: 16-px patches, learned position embeddings resampled to each grid, and DeepStack: features of three
  intermediate vision blocks are added to the outputs of the first three LLM layers at the image positions.

The number of image tokens follows the image's size, ``(H / unit) * (W / unit)`` with ``unit = patch * merge``:
any size that is a multiple of the unit, square or not, and per-image sizes in one batch (a list of tensors).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Backbone, VisionOutput, hw, register_backbone


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


def _as_list(images: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """A batch ``[B,3,H,W]`` or a list of ``[3,H_i,W_i]`` as a list of ``[1,3,H_i,W_i]`` groups of one size."""
    if isinstance(images, torch.Tensor):
        return [images]
    return [im.unsqueeze(0) for im in images]


@register_backbone
class Qwen2VLBackbone(Backbone):
    name = "qwen2vl"
    model_class_name = "Qwen2VLForConditionalGeneration"
    model_types = ("qwen2_vl",)
    variable_image_tokens = True
    dynamic_resolution = True

    def frozen_towers(self, lvlm: nn.Module) -> list[nn.Module]:
        return [lvlm.model.visual]

    def image_token_id(self, config) -> int:
        return int(config.image_token_id)

    def _unit(self, config) -> int:
        return int(config.vision_config.patch_size) * int(config.vision_config.spatial_merge_size)

    def check_image_size(self, config, image_size) -> None:
        unit = self._unit(config)
        h, w = hw(image_size)
        if h % unit or w % unit or h <= 0 or w <= 0:
            raise ValueError(f"{self.describe()} image sides must be positive multiples of {unit} (patch "
                             f"{config.vision_config.patch_size} x merge {config.vision_config.spatial_merge_size}), "
                             f"got {h}x{w}")

    def num_image_tokens(self, config, image_size) -> int:
        h, w = hw(image_size)
        unit = self._unit(config)
        return (h // unit) * (w // unit)

    def image_body_ids(self, config, image_size) -> list[int]:
        body = super().image_body_ids(config, image_size)
        return [int(config.vision_start_token_id), *body, int(config.vision_end_token_id)]

    def _patchify(self, config, pixels):
        vc = config.vision_config
        return patchify(pixels, int(vc.patch_size), int(vc.temporal_patch_size), int(vc.spatial_merge_size))

    def _patches(self, config, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat patches and ``image_grid_thw`` of every image, in batch order (one call to the vision tower; its
        attention never crosses images, so each image's features are those it would have alone)."""
        parts = [self._patchify(config, group) for group in _as_list(images)]
        return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])

    def _vision_call(self, lvlm: nn.Module, images):
        """(transformers' vision output, image tokens of each image ``[B]``)."""
        flat, grid = self._patches(lvlm.config, images)
        merge = int(lvlm.config.vision_config.spatial_merge_size)
        counts = grid.prod(-1) // merge ** 2
        return lvlm.model.get_image_features(pixel_values=flat, image_grid_thw=grid, return_dict=True), counts

    def vision(self, lvlm: nn.Module, images) -> VisionOutput:
        out, counts = self._vision_call(lvlm, images)
        feats = out.pooler_output
        return VisionOutput(torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats, counts)

    def image_sizes(self, config, pixels) -> list[tuple[int, int]]:
        """The size of each image tensor (its number of image tokens follows it)."""
        return [hw(im.shape[-2:]) for im in pixels]

    def image_features(self, lvlm: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.vision(lvlm, pixels).tokens
        return feats.reshape(pixels.shape[0], -1, feats.shape[-1])

    def _grids(self, config, image_size, batch: int, device) -> torch.Tensor:
        """``image_grid_thw [B, 3]`` (in patches) of one image per row: one size for all rows or one per row."""
        patch = int(config.vision_config.patch_size)
        sizes = image_size if isinstance(image_size, list) else [image_size] * batch
        return torch.tensor([[1, h // patch, w // patch] for h, w in map(hw, sizes)], dtype=torch.long,
                            device=device)

    def position_ids(self, lvlm, ids, mask, image_size):
        """M-RoPE positions ``[3, B, T]`` from the model's own ``get_rope_index`` (one image per row; ``image_size``
        one size for all rows or a list of per-row sizes); None for text only."""
        if image_size is None:
            return None  # text only: arange on all three axes equals 1-D RoPE
        types = (ids == self.image_token_id(lvlm.config)).int()
        grid = self._grids(lvlm.config, image_size, ids.shape[0], ids.device)
        # Computed here, never left to the model's forward, whose rope_deltas cache is stateful.
        pos, _ = lvlm.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=mask)
        return pos

    def generation_inputs(self, lvlm, ids, mask, pixels):
        flat, grid = self._patches(lvlm.config, pixels)
        types = (ids == self.image_token_id(lvlm.config)).int()
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": flat, "image_grid_thw": grid,
                "mm_token_type_ids": types}
