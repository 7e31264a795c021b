"""LLaVA-NeXT (CLIP ViT-L/14-336 + MLP projector + LLaMA-3 / Vicuna / Mistral): anyres tiles, a variable number of
image tokens per image.

Shares LLaVA-1.5's layout (``model.vision_tower``, ``model.multi_modal_projector``, ``<image>`` slots filled by
projected features); what differs is the image part. An input is the packed tensor of :mod:`..anyres` (the
processor's base view and tiles plus the original size), and the features are transformers' own
``LlavaNextModel.get_image_features`` (``pack_image_features``: grid shape from ``get_anyres_image_grid_shape``,
``unpad_image``, one ``image_newline`` per feature row, base view first), so they are exactly the model's.
"""
from __future__ import annotations

import torch
from torch import nn

from ..anyres import AnyresGeometry, unpack
from .base import register_backbone
from .llava import LlavaBackbone


@register_backbone
class LlavaNextBackbone(LlavaBackbone):
    name = "llava_next"
    model_class_name = "LlavaNextForConditionalGeneration"
    model_types = ("llava_next",)
    variable_image_tokens = True

    def frozen_towers(self, lvlm: nn.Module) -> list[nn.Module]:
        return [lvlm.model.vision_tower, lvlm.model.multi_modal_projector]

    def architecture(self, config) -> dict:
        # The registered image_size is the side of the square image image_input_ids() describes when no size is
        # given (the count depends on the side: squares up to one tile get a 1x2 grid, larger ones 2x2).
        return {}

    def geometry(self, config) -> AnyresGeometry:
        return AnyresGeometry.from_config(config)

    def check_image_size(self, config, image_size: int) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")

    def input_size(self, config, image_size: int) -> tuple[int, int]:
        return self.geometry(config).canvas

    def num_image_tokens(self, config, image_size: int | tuple[int, int]) -> int:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return self.geometry(config).num_tokens(int(h), int(w))

    def image_batch(self, lvlm: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``[B, 3, (1+K)*P+1, P]`` -> (features ``[B, N_max, H]`` right-padded with zeros, counts ``[B]``)."""
        views, sizes = unpack(pixels, self.geometry(lvlm.config))
        feats = lvlm.model.get_image_features(pixel_values=views, image_sizes=sizes, return_dict=True).pooler_output
        counts = torch.tensor([f.shape[0] for f in feats], dtype=torch.long, device=pixels.device)
        return nn.utils.rnn.pad_sequence(list(feats), batch_first=True), counts

    def image_features(self, lvlm: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        feats, counts = self.image_batch(lvlm, pixels)
        if bool((counts != counts[0]).any()):
            raise ValueError(f"these images have different numbers of image tokens ({counts.tolist()}); use "
                             f"encode_image, which handles that, or images of one aspect ratio")
        return feats

    def image_sizes(self, config, pixels: torch.Tensor) -> list[tuple[int, int]]:
        """Original ``(height, width)`` of each packed image."""
        return [tuple(s) for s in unpack(pixels, self.geometry(config))[1].tolist()]

    def generation_inputs(self, lvlm, ids, mask, pixels):
        views, sizes = unpack(pixels, self.geometry(lvlm.config))
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": views, "image_sizes": sizes}
