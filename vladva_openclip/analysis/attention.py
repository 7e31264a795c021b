"""Where the summary token looks (the paper's Fig. 6): its attention over the image tokens, per layer and head,
laid over the image, before and after fine-tuning; and one scalar per head, the entropy of that attention
(renormalised over the image tokens), to ask whether fine-tuning densifies it.

The LLM runs with eager attention only inside the analysis (:func:`._lvlm.eager_attention` restores the previous
implementation). Image tokens are mapped back to image positions per backbone (:mod:`.image_grid`: LLaVA's patch
grid, Qwen2-VL's merged 2x2 windows).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import _lvlm
from .data import AnalysisData, image_batches
from .image_grid import ImageGrid, image_grid, to_spatial
from .metrics import distribution_entropy
from .outputs import markdown_table, write_csv, write_json, write_safetensors, write_text

__all__ = ["AttentionResult", "attention_maps", "default_layers"]


@dataclass
class AttentionResult:
    """Attention of the summary token over the image tokens.

    Attributes:
        models: labels, in order; layers / heads: the LLM layers and heads (all of them).
        images: what each model saw (the preprocessed image, un-normalised), for overlays; image_keys: names.
        maps: ``[n_images, L, H, rows, cols]`` per model: each head's attention over the image tokens,
            renormalised to sum to 1 over them (the spatial pattern, whatever the total mass).
        image_mass: ``[n_images, L, H]`` per model: the share of the summary token's attention that goes to image
            tokens at all.
        head_entropy: ``[L, H]`` per model: mean over the images of the entropy (nats) of ``maps``.
        max_entropy: ``log(number of spatial image tokens)``, the entropy of uniform attention.
        grid: the image-token layout.
    """

    models: list[str]
    layers: list[int]
    heads: list[int]
    images: list[Image.Image]
    image_keys: list[str]
    maps: dict[str, torch.Tensor]
    image_mass: dict[str, torch.Tensor]
    head_entropy: dict[str, torch.Tensor]
    max_entropy: float
    grid: ImageGrid
    info: dict[str, Any]

    def head_rows(self) -> list[dict[str, Any]]:
        rows = []
        for m in self.models:
            for li, layer in enumerate(self.layers):
                for hi, head in enumerate(self.heads):
                    rows.append({"model": m, "layer": layer, "head": head,
                                 "entropy": float(self.head_entropy[m][li, hi]),
                                 "normalised_entropy": float(self.head_entropy[m][li, hi]) / self.max_entropy
                                 if self.max_entropy > 0 else float("nan"),
                                 "image_mass": float(self.image_mass[m][:, li, hi].mean())})
        return rows

    def summary(self) -> dict[str, dict[str, float]]:
        """Per model: mean head entropy, its share of the uniform entropy, mean attention mass on the image."""
        return {m: {"mean_head_entropy": float(self.head_entropy[m].mean()),
                    "normalised_entropy": float(self.head_entropy[m].mean()) / self.max_entropy
                    if self.max_entropy > 0 else float("nan"),
                    "image_mass": float(self.image_mass[m].mean())} for m in self.models}

    def to_markdown(self) -> str:
        rows = [{"model": m, **v} for m, v in self.summary().items()]
        return markdown_table(rows, ["model", "mean_head_entropy", "normalised_entropy", "image_mass"])

    def save(self, out: str | os.PathLike, plots: bool = True, map_layers: Sequence[int] | None = None,
             map_heads: Sequence[int] | None = None) -> dict[str, str]:
        """``attention_heads.csv``, ``attention.json``, ``attention_maps.safetensors`` (the maps, one tensor per
        model), ``attention.md``, one PNG grid per image
        (``attention_maps_<i>.png``, chosen layers x heads) and ``attention_entropy.png``."""
        out = Path(out)
        files = {"csv": write_csv(out / "attention_heads.csv", self.head_rows()),
                 "json": write_json(out / "attention.json", {
                     "models": self.models, "layers": self.layers, "heads": self.heads, "images": self.image_keys,
                     "grid": vars(self.grid), "max_entropy": self.max_entropy, "summary": self.summary(),
                     "head_entropy": {m: v for m, v in self.head_entropy.items()},
                     "image_mass": {m: v for m, v in self.image_mass.items()},
                     "maps_file": "attention_maps.safetensors", "info": self.info}),
                 "maps": write_safetensors(out / "attention_maps.safetensors", self.maps),
                 "md": write_text(out / "attention.md", self.to_markdown() + "\n")}
        if plots:
            from .plots import plot_attention_entropy, plot_attention_maps

            layers = list(map_layers) if map_layers is not None else default_layers(len(self.layers))
            heads = list(map_heads) if map_heads is not None else self.heads[:8]
            for i in range(len(self.images)):
                files[f"maps_{i}"] = plot_attention_maps(self, i, out / f"attention_maps_{i}.png", layers, heads)
            files["entropy_png"] = plot_attention_entropy(self, out / "attention_entropy.png")
        return {k: str(v) for k, v in files.items()}


def default_layers(num_layers: int, count: int = 4) -> list[int]:
    """Up to ``count`` evenly spaced layers ending with the last (the one the embedding comes from)."""
    if num_layers <= count:
        return list(range(num_layers))
    return sorted({round((num_layers - 1) * (k + 1) / count) for k in range(count)})


def _shown_image(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """The preprocessed tensor ``[3, S, S]`` back to a PIL image: exactly the pixels the model saw."""
    x = pixels.float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


@torch.no_grad()
def _summary_image_attention(model, preprocess: Callable, data: AnalysisData, indices: Sequence[int],
                             batch_size: int, image_prompt: str | None) -> tuple[torch.Tensor, list[Image.Image]]:
    """``[n, L, H, N_img]`` attention of the summary token over the image tokens, and the images shown."""
    # The preprocess of a dynamic-resolution family (Qwen) gives one fixed square: one grid for every image.
    if model.backbone.variable_image_tokens and not model.backbone.dynamic_resolution:
        raise ValueError(f"attention maps need one square patch grid per image; {model.model_name} "
                         f"({model.backbone.name}) lays each image out as its own anyres tiles, which these maps do "
                         f"not draw. Use a fixed-grid model (LLaVA-1.5, Qwen2-VL) for `analyze attention`")
    runner = model if image_prompt is None else _lvlm.prompt_view(model, image_prompt=image_prompt)
    positions = _lvlm.image_token_positions(runner).cpu()
    weights, shown = [], []
    with _lvlm.summary_attention(model) as records:
        for _, pixels in image_batches(data.images, preprocess, batch_size, indices):
            runner.encode_image(pixels.to(model.device))
            shown += [_shown_image(p, model.visual.image_mean, model.visual.image_std) for p in pixels]
    for rec in records:
        weights.append(rec.weights[..., positions])
    return torch.cat(weights), shown


def attention_maps(
    models: Mapping[str, tuple[torch.nn.Module, Callable]],
    data: AnalysisData,
    *,
    image_indices: Sequence[int] | None = None,
    batch_size: int = 4,
    image_prompt: str | None = None,
) -> AttentionResult:
    """The summary token's attention over the image tokens, every layer and head, per model.

    Args:
        models: label -> (VladVA model, preprocess); every model must have the same image-token grid.
        image_indices: which images (default: the first 4).
        batch_size: images per forward (eager attention materialises ``[B, H, T, T]`` per layer).
        image_prompt: a handcrafted prompt for every model (default: each model's own, soft prompts included).
    """
    if not models:
        raise ValueError("no models given")
    indices = list(range(min(4, len(data.images))) if image_indices is None else image_indices)
    if not indices:
        raise ValueError("no images to analyse")
    bad = [i for i in indices if not 0 <= i < len(data.images)]
    if bad:
        raise IndexError(f"image indices {bad[:5]} are out of range (the data has {len(data.images)} images)")
    grid = None
    maps, mass, entropy = {}, {}, {}
    shown: list[Image.Image] = []
    num_layers = num_heads = 0
    for label, (model, preprocess) in models.items():
        _lvlm.require_vladva(model, f"the attention maps ({label})")
        model.eval()
        g = image_grid(model)
        if grid is not None and g != grid:
            raise ValueError(f"model {label!r} has image grid {g}, the others {grid}: compare models of one family")
        grid = g
        w, shown = _summary_image_attention(model, preprocess, data, indices, batch_size, image_prompt)
        num_layers, num_heads = w.shape[1], w.shape[2]
        spatial = w[..., grid.skip:]
        mass[label] = w.sum(-1)
        norm = spatial / spatial.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        maps[label] = to_spatial(torch.cat([w[..., :grid.skip], norm], dim=-1), grid)
        entropy[label] = distribution_entropy(spatial).mean(0)
    info = {"image_prompt": image_prompt or "each model's own", "image_indices": indices, "data": data.info,
            "what": "attention of the summary (last) token over the image tokens; maps renormalised over them"}
    return AttentionResult(list(models), list(range(num_layers)), list(range(num_heads)), shown,
                           [data.images.keys[i] for i in indices], maps, mass, entropy,
                           math.log(grid.rows * grid.cols), grid, info)
