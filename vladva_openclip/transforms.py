"""Per-backbone image preprocessing as open_clip preprocess configs (fixed-size square tensors).

- LLaVA-1.5 (``resize_mode="shortest"``): exactly what llava-hf's CLIPImageProcessor does (bicubic resize of the
  short side to 336, centre crop 336x336, CLIP mean/std): with the processor's PIL backend the pixels are
  bit-identical (tests/test_real_layouts.py).
- Qwen2-VL (``resize_mode="squash"``): its processor keeps the whole image at its own aspect ratio and resolution
  (smart_resize to multiples of 28), which a fixed-size batch cannot. Of the three open_clip modes, squash (whole
  image, every image token holds content) gives embeddings closest to the processor's, then shortest (crops the
  sides off), then longest (whole image at its aspect ratio, padded): see BENCHMARKS.md
  (``benchmarks/bench_qwen_preprocess.py``). ``resize_mode="longest"`` is the aspect-preserving choice.
- Qwen2.5-VL and Qwen3-VL: the same choice (squash, measured the same way). Beside it, the dynamic-resolution
  families take images at their own size: :class:`NativeTransform` is the processor's geometry (``smart_resize``)
  under a pixel budget, and ``encode_image`` takes a list of such tensors of different sizes.
- LLaVA-NeXT (``resize_mode="anyres"``): transformers' own ``LlavaNextImageProcessor`` (base view plus the grid
  tiles of the best pinpoint, aspect ratio kept), packed with the image's size into one fixed-shape tensor that
  open_clip can stack (``anyres.py``). Its open_clip ``resize_mode`` string carries the geometry
  (``"anyres:336/14:336x672,..."``), so a saved ``preprocess_cfg`` rebuilds the same transform; the integration
  dispatches it (``integration.py``, ``image_transform_v2``).
"""
from __future__ import annotations

import math
from typing import Any

from .config import VladVAConfig


def preprocess_cfg(cfg: VladVAConfig) -> dict[str, Any]:
    """open_clip ``PreprocessCfg`` fields of ``cfg``: ``image_size`` square, its mean/std, bicubic, its resize mode
    (padding, for ``"longest"``, is black, as open_clip pads)."""
    if cfg.resize_mode == "anyres":
        from .anyres import AnyresGeometry, resize_mode_string

        geometry = AnyresGeometry.from_config(cfg.hf_config)
        return {"size": geometry.canvas, "mode": "RGB", "mean": tuple(cfg.image_mean), "std": tuple(cfg.image_std),
                "interpolation": "bicubic", "resize_mode": resize_mode_string(geometry), "fill_color": 0}
    return {
        "size": (cfg.image_size, cfg.image_size),
        "mode": "RGB",
        "mean": tuple(cfg.image_mean),
        "std": tuple(cfg.image_std),
        "interpolation": "bicubic",
        "resize_mode": cfg.resize_mode,
        "fill_color": 0,
    }


# ---- native resolution (dynamic-resolution families) -------------------------------------------------------------
# The pixel band of each family's own processor (Qwen2VLImageProcessor's min/max_pixels; Qwen3-VL's ``size``).
PROCESSOR_PIXELS: dict[str, tuple[int, int]] = {
    "qwen2vl": (3136, 12845056), "qwen25vl": (3136, 12845056), "qwen3vl": (65536, 16777216),
}


def native_size(height: int, width: int, unit: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen's processor resizes an image to (``smart_resize``): both sides multiples of ``unit``, the pixel
    count inside ``[min_pixels, max_pixels]``, the aspect ratio as close as that allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height}x{width} pixels: the aspect ratio must be below 200")
    h = round(height / unit) * unit
    w = round(width / unit) * unit
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(unit, math.floor(height / beta / unit) * unit)
        w = max(unit, math.floor(width / beta / unit) * unit)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / unit) * unit
        w = math.ceil(width * beta / unit) * unit
    return h, w


class NativeTransform:
    """PIL image -> ``[3, H, W]`` at the image's own aspect ratio (Qwen's processor geometry: bicubic resize to
    :func:`native_size`, rescale, normalise), for ``model.encode_image([...])`` with one size per image.

    Args:
        model: a VladVA model of a dynamic-resolution family.
        max_pixels: pixel budget; default the model's square input (``image_size ** 2``: as many image tokens as
            the fixed-size path at most). ``"processor"`` takes the family processor's own band, so the pixels
            equal the processor's (its PIL backend).
        min_pixels: lower bound; default the family processor's.
    """

    def __init__(self, model, max_pixels: int | str | None = None, min_pixels: int | None = None):
        backbone = model.backbone
        if not backbone.dynamic_resolution or backbone.name not in PROCESSOR_PIXELS:
            raise ValueError(f"{model.cfg.backbone} takes one fixed image size; use the model's preprocess")
        lo, hi = PROCESSOR_PIXELS[backbone.name]
        self.unit = backbone._unit(model.lvlm.config)
        self.min_pixels = lo if min_pixels is None else int(min_pixels)
        self.max_pixels = (hi if max_pixels == "processor" else model.cfg.image_size ** 2 if max_pixels is None
                           else int(max_pixels))
        self.mean, self.std = tuple(model.cfg.image_mean), tuple(model.cfg.image_std)

    def __call__(self, image):
        import torchvision.transforms.functional as TF
        from PIL import Image

        image = image.convert("RGB")
        h, w = native_size(image.height, image.width, self.unit, self.min_pixels, self.max_pixels)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)
