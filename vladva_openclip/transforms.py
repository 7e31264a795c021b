"""Per-backbone image preprocessing as open_clip preprocess configs (fixed-size square tensors).

- LLaVA-1.5 (``resize_mode="shortest"``): exactly what llava-hf's CLIPImageProcessor does (bicubic resize of the
  short side to 336, centre crop 336x336, CLIP mean/std): with the processor's PIL backend the pixels are
  bit-identical (tests/test_real_layouts.py).
- Qwen2-VL (``resize_mode="squash"``): its processor keeps the whole image at its own aspect ratio and resolution
  (smart_resize to multiples of 28), which a fixed-size batch cannot. Of the three open_clip modes, squash (whole
  image, every image token holds content) gives embeddings closest to the processor's, then shortest (crops the
  sides off), then longest (whole image at its aspect ratio, padded): see BENCHMARKS.md
  (``benchmarks/bench_qwen_preprocess.py``). ``resize_mode="longest"`` is the aspect-preserving choice.
- LLaVA-NeXT (``resize_mode="anyres"``): transformers' own ``LlavaNextImageProcessor`` (base view plus the grid
  tiles of the best pinpoint, aspect ratio kept), packed with the image's size into one fixed-shape tensor that
  open_clip can stack (``anyres.py``). Its open_clip ``resize_mode`` string carries the geometry
  (``"anyres:336/14:336x672,..."``), so a saved ``preprocess_cfg`` rebuilds the same transform; the integration
  dispatches it (``integration.py``, ``image_transform_v2``).
"""
from __future__ import annotations

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
