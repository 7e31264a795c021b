"""Per-backbone image preprocessing as open_clip preprocess configs (fixed-size square tensors)."""
from __future__ import annotations

from typing import Any

from .config import VladVAConfig


def preprocess_cfg(cfg: VladVAConfig) -> dict[str, Any]:
    """open_clip ``PreprocessCfg`` fields: LLaVA-1.5 at 336 px (CLIP mean/std, squash-free center crop),
    Qwen2-VL at a fixed size that is a multiple of 28 (its processor's OpenAI-CLIP mean/std)."""
    return {
        "size": (cfg.image_size, cfg.image_size),
        "mode": "RGB",
        "mean": tuple(cfg.image_mean),
        "std": tuple(cfg.image_std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }
