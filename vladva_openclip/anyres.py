"""LLaVA-NeXT's "anyres" images as one fixed-shape open_clip tensor.

LLaVA-NeXT sees an image as a base view (the whole image resized to ``P x P``) plus a grid of ``P x P`` tiles cut
from the image resized, aspect ratio kept, to the best of the checkpoint's ``image_grid_pinpoints`` and padded to it.
Its features are then unpadded (the rows or columns that only saw padding are dropped) and every row of tile
features ends with the learnt ``image_newline`` vector. The number of image tokens therefore depends on the
image's own height and width, and the model needs that size, not only the pixels.

open_clip pipelines move images as one stacked tensor per batch, so the transform here packs everything the model
needs into one tensor of a fixed shape, ``[3, (1 + K) * P + 1, P]`` (``K``: the most tiles a pinpoint holds):

- rows ``[k * P, (k + 1) * P)``: view ``k`` exactly as ``LlavaNextImageProcessor`` returns it (``k = 0`` the base
  view, then the tiles in raster order); views past the image's own count are zeros and never reach the model;
- the last row, channel 0: the image's original height and width as 16-bit binary numbers (values 0.0 / 1.0,
  exact in every float dtype an open_clip pipeline may cast to) followed by a fixed marker pattern, so that a
  tensor that did not come from this transform is refused with a clear message instead of being misread.

The pixels are the processor's own (the transform calls it), so embeddings equal transformers'
``LlavaNextForConditionalGeneration`` on ``LlavaNextProcessor``'s output (tests/test_llava_next.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

BITS = 16
# 1010... after the two sizes: a zero tensor, a plain image or a truncated canvas fails the check.
MARKER = [float(i % 2 == 0) for i in range(16)]
META_WIDTH = 2 * BITS + len(MARKER)


@dataclass(frozen=True)
class AnyresGeometry:
    """What decides the token layout of a LLaVA-NeXT checkpoint.

    Attributes:
        tile: ``P``, the vision tower's input side (its ``image_size``).
        patch: the vision tower's patch side.
        pinpoints: ``image_grid_pinpoints`` as ``(height, width)`` pairs, multiples of ``tile``.
        full: ``vision_feature_select_strategy == "full"`` (the CLS feature is kept).
    """

    tile: int
    patch: int
    pinpoints: tuple[tuple[int, int], ...]
    full: bool = False

    def __post_init__(self):
        if self.tile < META_WIDTH:
            raise ValueError(f"anyres tiles of {self.tile} px cannot carry the packed image size ({META_WIDTH} "
                             f"columns); tiles must be at least {META_WIDTH} px wide")
        bad = [p for p in self.pinpoints if p[0] % self.tile or p[1] % self.tile]
        if bad or not self.pinpoints:
            raise ValueError(f"image_grid_pinpoints must be multiples of the tile side {self.tile}, "
                             f"got {bad or 'none'}")

    @classmethod
    def from_config(cls, config: Any) -> AnyresGeometry:
        """From a transformers ``LlavaNextConfig`` (or its dict)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        vision = get("vision_config")
        vget = vision.get if isinstance(vision, dict) else lambda k, d=None: getattr(vision, k, d)
        pins = tuple((int(h), int(w)) for h, w in get("image_grid_pinpoints"))
        return cls(int(vget("image_size")), int(vget("patch_size")), pins,
                   get("vision_feature_select_strategy", "default") == "full")

    @property
    def max_tiles(self) -> int:
        return max((h // self.tile) * (w // self.tile) for h, w in self.pinpoints)

    @property
    def canvas(self) -> tuple[int, int]:
        """``(height, width)`` of the packed tensor."""
        return (1 + self.max_tiles) * self.tile + 1, self.tile

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        """The pinpoint the processor resizes an image of this size to (transformers' select_best_resolution)."""
        from transformers.image_processing_utils import select_best_resolution

        return tuple(select_best_resolution((height, width), [list(p) for p in self.pinpoints]))

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens of an image of ``height x width`` pixels: base view, unpadded tile features and one newline
        per feature row, as ``LlavaNextProcessor`` counts them and ``pack_image_features`` lays them out."""
        side = self.tile // self.patch
        best_h, best_w = self.best_resolution(height, width)
        rows, cols = side * (best_h // self.tile), side * (best_w // self.tile)
        # unpad_image's rule on the [rows, cols] feature grid of the padded pinpoint image
        if width / height > cols / rows:
            kept = int(round(height * (cols / width), 7))
            rows -= 2 * ((rows - kept) // 2)
        else:
            kept = int(round(width * (rows / height), 7))
            cols -= 2 * ((cols - kept) // 2)
        return side * side + int(self.full) + rows * cols + rows


def _bits(value: int) -> list[float]:
    if not 0 < value < 2 ** BITS:
        raise ValueError(f"image side {value} is outside 1..{2 ** BITS - 1}")
    return [float(value >> (BITS - 1 - i) & 1) for i in range(BITS)]


def pack(views: torch.Tensor, height: int, width: int, geometry: AnyresGeometry) -> torch.Tensor:
    """One image's processor output -> the packed tensor.

    Args:
        views: ``[V, 3, P, P]`` (base view first, then the tiles), ``V <= 1 + max_tiles``.
        height, width: the original image size.

    Returns:
        ``[3, (1 + max_tiles) * P + 1, P]`` float32.
    """
    p = geometry.tile
    if views.dim() != 4 or tuple(views.shape[1:]) != (3, p, p) or views.shape[0] > 1 + geometry.max_tiles:
        raise ValueError(f"expected at most {1 + geometry.max_tiles} views [3,{p},{p}], got {tuple(views.shape)}")
    out = torch.zeros(3, *geometry.canvas, dtype=torch.float32)
    out[:, : views.shape[0] * p] = views.float().permute(1, 0, 2, 3).reshape(3, -1, p)
    out[0, -1, :META_WIDTH] = torch.tensor(_bits(height) + _bits(width) + MARKER)
    return out


def unpack(pixels: torch.Tensor, geometry: AnyresGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed batch -> transformers' inputs.

    Args:
        pixels: ``[B, 3, (1 + max_tiles) * P + 1, P]`` from :class:`AnyresTransform` (any float dtype).

    Returns:
        ``pixel_values [B, 1 + max_tiles, 3, P, P]`` (what ``LlavaNextModel.get_image_features`` takes; views past
        an image's own count are zeros and unused) and ``image_sizes [B, 2]`` (height, width; long).
    """
    p = geometry.tile
    meta = pixels[:, 0, -1, :META_WIDTH].float()
    marker = torch.tensor(MARKER, device=meta.device)
    if not bool((meta[:, 2 * BITS:] == marker).all()) or not bool(((meta == 0) | (meta == 1)).all()):
        raise ValueError("this LLaVA-NeXT model takes images packed by its own preprocess transform (the processor's "
                         "base view and tiles plus the image size); build inputs with the transform returned by "
                         "open_clip.create_model_and_transforms, not a plain resize")
    weights = 2 ** torch.arange(BITS - 1, -1, -1, device=meta.device, dtype=torch.float32)
    sizes = torch.stack([(meta[:, :BITS] * weights).sum(1), (meta[:, BITS:2 * BITS] * weights).sum(1)], 1).long()
    b = pixels.shape[0]
    views = pixels[:, :, :-1].reshape(b, 3, 1 + geometry.max_tiles, p, p).permute(0, 2, 1, 3, 4)
    return views, sizes


class AnyresTransform:
    """PIL image -> packed tensor, through transformers' own ``LlavaNextImageProcessor`` (so the pixels are the
    processor's, bit for bit).

    Args:
        geometry: the checkpoint's tile size, patch size and pinpoints.
        mean, std: normalisation (CLIP's for LLaVA-NeXT).
        backend: ``"torchvision"`` (transformers 5's default for ``AutoProcessor``) or ``"pil"``.
    """

    def __init__(self, geometry: AnyresGeometry, mean: tuple[float, ...], std: tuple[float, ...],
                 backend: str = "torchvision"):
        self.geometry = geometry
        self.mean, self.std, self.backend = tuple(mean), tuple(std), backend
        self._processor = None

    def processor(self):
        if self._processor is None:
            if self.backend == "pil":
                from transformers.models.llava_next.image_processing_pil_llava_next import (
                    LlavaNextImageProcessorPil as cls,
                )
            else:
                from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor as cls
            p = self.geometry.tile
            self._processor = cls(size={"shortest_edge": p}, crop_size={"height": p, "width": p},
                                  image_grid_pinpoints=[list(x) for x in self.geometry.pinpoints],
                                  image_mean=list(self.mean), image_std=list(self.std), do_pad=True)
        return self._processor

    def __getstate__(self):  # DataLoader workers rebuild the processor rather than pickling it
        return {**self.__dict__, "_processor": None}

    def __call__(self, image) -> torch.Tensor:
        out = self.processor()(images=image.convert("RGB"), return_tensors="pt")
        height, width = (int(v) for v in out["image_sizes"][0])
        count = 1 + _grid_tiles(self.geometry, height, width)
        return pack(out["pixel_values"][0, :count], height, width, self.geometry)

    def __repr__(self) -> str:
        g = self.geometry
        return (f"AnyresTransform(tile={g.tile}, pinpoints={list(g.pinpoints)}, backend={self.backend!r}, "
                f"mean={self.mean}, std={self.std})")


def _grid_tiles(geometry: AnyresGeometry, height: int, width: int) -> int:
    best_h, best_w = geometry.best_resolution(height, width)
    return (best_h // geometry.tile) * (best_w // geometry.tile)


RESIZE_MODE = "anyres"


def resize_mode_string(geometry: AnyresGeometry) -> str:
    """The open_clip ``resize_mode`` that names this transform and carries its geometry (so a saved
    ``preprocess_cfg`` rebuilds it): ``"anyres:<tile>/<patch>:<h>x<w>,..."``."""
    pins = ",".join(f"{h}x{w}" for h, w in geometry.pinpoints)
    return f"{RESIZE_MODE}:{geometry.tile}/{geometry.patch}:{pins}{':full' if geometry.full else ''}"


def parse_resize_mode(mode: str) -> AnyresGeometry | None:
    """Inverse of :func:`resize_mode_string`; None for any other mode (open_clip's own)."""
    if not isinstance(mode, str) or not mode.startswith(RESIZE_MODE + ":"):
        return None
    parts = mode.split(":")
    try:
        tile, patch = (int(v) for v in parts[1].split("/"))
        pins = tuple(tuple(int(v) for v in p.split("x")) for p in parts[2].split(","))
    except (IndexError, ValueError):
        raise ValueError(f"malformed anyres resize mode {mode!r}; "
                         f"expected 'anyres:<tile>/<patch>:<h>x<w>,...'") from None
    return AnyresGeometry(tile, patch, pins, full=len(parts) > 3 and parts[3] == "full")
