"""Where each image token of an LVLM comes from in the image, per backbone family (a registry).

LLaVA-1.5: one token per ViT patch, row-major over the ``(S/p) x (S/p)`` patch grid (a CLS token first when the
feature strategy is ``full``). Qwen2-VL: the merger turns each ``m x m`` window of patches into one token, and the
windows come in row-major order (``backbones.qwen2vl.patchify`` keeps windows contiguous), so token k covers the
window at ``(k // cols, k % cols)`` of the ``(S/(p*m)) x (S/(p*m))`` grid, ``p*m`` pixels on a side. Qwen2.5-VL
(its window attention reorders patches only inside the tower) and Qwen3-VL (16-px patches) keep that order.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["GRIDS", "ImageGrid", "image_grid", "register_grid", "to_spatial"]


@dataclass(frozen=True)
class ImageGrid:
    """Layout of the image tokens.

    Attributes:
        rows, cols: the token grid.
        cell: pixels per token side in the model's input image.
        skip: leading tokens that are not spatial (LLaVA's CLS with the ``full`` strategy).
    """

    rows: int
    cols: int
    cell: int
    skip: int = 0

    @property
    def num_tokens(self) -> int:
        return self.skip + self.rows * self.cols


GRIDS: dict[str, Callable[[object, int], ImageGrid]] = {}


def register_grid(backbone: str) -> Callable:
    def wrap(fn: Callable[[object, int], ImageGrid]) -> Callable:
        if backbone in GRIDS:
            raise KeyError(f"an image grid for backbone {backbone!r} is already registered")
        GRIDS[backbone] = fn
        return fn
    return wrap


@register_grid("llava")
def _llava_grid(config, image_size: int) -> ImageGrid:
    patch = int(config.vision_config.patch_size)
    side = image_size // patch
    return ImageGrid(side, side, patch, skip=0 if config.vision_feature_select_strategy == "default" else 1)


@register_grid("qwen3vl")
@register_grid("qwen25vl")
@register_grid("qwen2vl")
def _qwen2vl_grid(config, image_size: int) -> ImageGrid:
    unit = int(config.vision_config.patch_size) * int(config.vision_config.spatial_merge_size)
    side = image_size // unit
    return ImageGrid(side, side, unit)


def image_grid(model) -> ImageGrid:
    """The grid of a VladVA model's image tokens."""
    try:
        fn = GRIDS[model.cfg.backbone]
    except KeyError:
        raise ValueError(f"no image grid registered for backbone {model.cfg.backbone!r}; "
                         f"known: {sorted(GRIDS)} (add one with register_grid)") from None
    return fn(model.lvlm.config, model.cfg.image_size)


def to_spatial(weights: torch.Tensor, grid: ImageGrid) -> torch.Tensor:
    """``[..., N]`` weights over the image tokens (in the model's order) -> ``[..., rows, cols]``."""
    if weights.shape[-1] != grid.num_tokens:
        raise ValueError(f"expected {grid.num_tokens} image tokens for a {grid.rows}x{grid.cols} grid "
                         f"(+{grid.skip} non-spatial), got {weights.shape[-1]}")
    return weights[..., grid.skip:].reshape(*weights.shape[:-1], grid.rows, grid.cols)
