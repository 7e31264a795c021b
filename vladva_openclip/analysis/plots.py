"""Figures in the layout of the paper's Figs. 2-7 (matplotlib, Agg backend; imported only when plotting)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from .outputs import save_figure


# What each figure reads, as structural types: the analyses' result classes satisfy them, and this module never
# imports the modules that call it (they import it lazily, only when plotting).
class PromptSearchData(Protocol):
    rows: Sequence[Any]  # .index, .{image,text}_entropy, .{image,text}_cev, .t2i_r1, .i2t_r1
    ranked: Sequence[Any]
    correlations: Mapping[str, Any]


class NextTokenData(Protocol):
    inputs: Sequence[Any]  # .key, .title
    models: Sequence[str]
    top: Mapping[str, Mapping[str, Sequence[Any]]]  # model -> input key -> [.token, .prob]
    entropy: Mapping[str, Mapping[str, float]]


class AttentionData(Protocol):
    layers: Sequence[int]
    heads: Sequence[int]
    models: Sequence[str]
    images: Sequence[Any]  # PIL images
    maps: Mapping[str, torch.Tensor]  # model -> [n_images, n_layers, n_heads, rows, cols]
    grid: Any  # .rows, .cols
    head_entropy: Mapping[str, torch.Tensor]  # model -> [n_layers, n_heads]
    max_entropy: float


class RetentionData(Protocol):
    models: Sequence[str]
    fact_metrics: Sequence[str]
    summary: Mapping[str, Mapping[str, Any]]

__all__ = ["plot_attention_entropy", "plot_attention_maps", "plot_cumulative_variance", "plot_next_tokens",
           "plot_prompt_entropy", "plot_retention", "plot_retrieval_by_entropy"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# ---- prompts (Figs. 2, 3, 5) -------------------------------------------------------------------------------
def plot_prompt_entropy(result: PromptSearchData, path: str | os.PathLike) -> Path:
    """Fig. 2: mean next-token entropy at the summary position per candidate, images and captions, sorted."""
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.18 * len(result.rows) + 2), 5.5), sharex=False)
    for ax, side, colour in zip(axes, ("image", "text"), ("tab:blue", "tab:orange")):
        rows = sorted(result.rows, key=lambda r: -getattr(r, f"{side}_entropy"))
        values = [getattr(r, f"{side}_entropy") for r in rows]
        ax.bar(range(len(rows)), values, color=colour)
        ax.set_xticks(range(len(rows)), [str(r.index) for r in rows], fontsize=6, rotation=90)
        ax.set_ylabel("entropy (nats)")
        ax.set_title(f"{'Image' if side == 'image' else 'Caption'} prompts: next-token entropy at the summary token",
                     fontsize=9)
    axes[-1].set_xlabel("candidate (index into prompts.csv), sorted by entropy")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_cumulative_variance(result: PromptSearchData, path: str | os.PathLike) -> Path:
    """Fig. 3: cumulative explained variance of the embedding matrix per candidate, coloured by its entropy."""
    plt = _plt()
    from matplotlib import cm, colors

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, side in zip(axes, ("image", "text")):
        ent = [getattr(r, f"{side}_entropy") for r in result.rows]
        norm = colors.Normalize(min(ent), max(ent) if max(ent) > min(ent) else min(ent) + 1e-6)
        cmap = cm.get_cmap("viridis") if hasattr(cm, "get_cmap") else plt.get_cmap("viridis")
        for r, e in sorted(zip(result.rows, ent), key=lambda t: t[1]):
            curve = getattr(r, f"{side}_cev")
            ax.plot(range(1, len(curve) + 1), curve, color=cmap(norm(e)), lw=0.9, alpha=0.85)
        for q in (0.9, 0.99):
            ax.axhline(q, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("principal components")
        ax.set_ylabel("cumulative explained variance")
        ax.set_title(f"{'Image' if side == 'image' else 'Caption'} embeddings ({len(result.rows)} prompts)",
                     fontsize=9)
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="entropy (nats)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_retrieval_by_entropy(result: PromptSearchData, path: str | os.PathLike) -> Path:
    """Fig. 5: R@1 both ways over the candidates ordered by entropy (mean of image and caption entropy)."""
    plt = _plt()
    rows = sorted(result.rows, key=lambda r: (r.image_entropy + r.text_entropy) / 2)
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(rows) + 2), 3.8))
    ax.plot(x, [r.t2i_r1 for r in rows], "o-", ms=3, label="text→image R@1")
    ax.plot(x, [r.i2t_r1 for r in rows], "s-", ms=3, label="image→text R@1")
    best = result.ranked[0]
    ax.axvline(rows.index(best), color="tab:red", ls="--", lw=0.8, label=f"recommended (#{best.index})")
    ax.set_xticks(list(x), [str(r.index) for r in rows], fontsize=6, rotation=90)
    ax.set_xlabel("candidate, ordered by mean next-token entropy (low → high)")
    ax.set_ylabel("R@1 (%)")
    corr = result.correlations
    if corr:
        rho_i = corr["image_entropy"]["mean_R@1"]["rho"]
        rho_t = corr["text_entropy"]["mean_R@1"]["rho"]
        rho_s = corr["score"]["mean_R@1"]["rho"]
        ax.set_title(f"Spearman with mean R@1: image entropy {rho_i:+.2f}, caption entropy {rho_t:+.2f}, "
                     f"score {rho_s:+.2f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- next tokens (Fig. 4) ----------------------------------------------------------------------------------
def plot_next_tokens(result: NextTokenData, path: str | os.PathLike, max_inputs: int = 6) -> Path:
    """Fig. 4: top-k next tokens per input (rows) and model (columns) as horizontal bars."""
    plt = _plt()
    inputs = result.inputs[:max_inputs]
    models = result.models
    fig, axes = plt.subplots(len(inputs), len(models), figsize=(3.2 * len(models), 1.9 * len(inputs)),
                             squeeze=False)
    for i, item in enumerate(inputs):
        for j, label in enumerate(models):
            ax = axes[i][j]
            top = result.top[label][item.key]
            toks = [repr(t.token)[1:-1] for t in top][::-1]
            probs = [t.prob for t in top][::-1]
            ax.barh(range(len(top)), probs, color=f"C{j}")
            ax.set_yticks(range(len(top)), toks, fontsize=6)
            ax.set_xlim(0, max(0.05, max(probs)) * 1.25)  # a flat distribution still shows its bars
            for y, v in enumerate(probs):
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=5)
            ax.tick_params(axis="x", labelsize=6)
            h = result.entropy[label][item.key]
            ax.set_title(f"{label}: H={h:.2f}", fontsize=7)
            if j == 0:
                ax.set_ylabel(item.title, fontsize=6, rotation=0, ha="right", va="center", wrap=True)
    fig.suptitle("Top next tokens at the summary position", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- attention (Fig. 6) ------------------------------------------------------------------------------------
def plot_attention_maps(result: AttentionData, image_index: int, path: str | os.PathLike,
                        layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> Path:
    """Fig. 6: the summary token's attention over the image tokens, laid over the image.

    Rows: model x layer; columns: the input image, then one panel per head.
    """
    plt = _plt()
    layers = list(result.layers if layers is None else layers)
    heads = list(result.heads if heads is None else heads)
    image = result.images[image_index]
    rows = [(m, layer) for m in result.models for layer in layers]
    def grid_of(label: str, layer: int, head: int) -> torch.Tensor:
        return result.maps[label][image_index, result.layers.index(layer), result.heads.index(head)]

    # One colour scale for the whole figure, so a spread-out head looks flat and a focused one bright.
    vmax = max(float(grid_of(m, layer, h).max()) for m, layer in rows for h in heads) or 1.0
    fig, axes = plt.subplots(len(rows), len(heads) + 1, figsize=(1.5 * (len(heads) + 1), 1.55 * len(rows)),
                             squeeze=False)
    shown = None
    for r, (label, layer) in enumerate(rows):
        axes[r][0].imshow(image)
        axes[r][0].set_ylabel(f"{label}\nlayer {layer}", fontsize=6)
        for c, head in enumerate(heads, start=1):
            ax = axes[r][c]
            grid = grid_of(label, layer, head)
            up = torch.nn.functional.interpolate(grid[None, None].float(), size=image.size[::-1], mode="nearest")[0, 0]
            ax.imshow(image)
            shown = ax.imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=vmax)
            if r == 0:
                ax.set_title(f"head {head}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    uniform = 1.0 / (result.grid.rows * result.grid.cols)
    fig.suptitle(f"Summary-token attention over the image tokens: each head's share per token "
                 f"(uniform = {uniform:.3g}; one scale for all panels)", fontsize=7)
    fig.tight_layout()
    fig.colorbar(shown, ax=axes, fraction=0.02, pad=0.01).ax.tick_params(labelsize=5)
    return save_figure(fig, path)


def plot_attention_entropy(result: AttentionData, path: str | os.PathLike) -> Path:
    """Per-head entropy of the summary token's attention over the image tokens, one bar per model."""
    plt = _plt()
    labels = [f"L{layer}H{head}" for layer in result.layers for head in result.heads]
    width = 0.8 / len(result.models)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(labels) * len(result.models) + 1.5), 3.4))
    for k, model in enumerate(result.models):
        values = result.head_entropy[model].flatten().tolist()
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=model, color=f"C{k}")
    ax.axhline(result.max_entropy, color="grey", ls=":", lw=0.8, label="uniform over image tokens")
    ax.set_xticks([i + width * (len(result.models) - 1) / 2 for i in range(len(labels))], labels, fontsize=6,
                  rotation=90)
    ax.set_ylabel("entropy over image tokens (nats)")
    ax.set_title("Does the summary token's attention densify? (higher = spread over more image tokens)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- retention (Fig. 7) ------------------------------------------------------------------------------------
def plot_retention(result: RetentionData, path: str | os.PathLike) -> Path:
    """Fig. 7 in numbers: fact precision/recall of the generated captions and the NLL of the references."""
    plt = _plt()
    models = result.models
    metrics: list[tuple[str, str]] = [(k, k.replace("_", " ")) for k in result.fact_metrics]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [3, 1.4]})
    width = 0.8 / max(1, len(models))
    nll_keys = sorted({k for s in result.summary.values() for k in s if k.startswith("reference_nll")})
    for k, model in enumerate(models):
        s: dict[str, Any] = result.summary[model]
        axes[0].bar([i + k * width for i in range(len(metrics))], [s.get(m, float("nan")) for m, _ in metrics],
                    width, label=model, color=f"C{k}")
        axes[1].bar([i + k * width for i in range(len(nll_keys))], [s.get(m, float("nan")) for m in nll_keys],
                    width, color=f"C{k}")
    axes[0].set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(metrics))], [t for _, t in metrics],
                       fontsize=7, rotation=20)
    axes[0].set_ylim(0, 100)
    axes[0].set_ylabel("%")
    axes[0].set_title("Facts in the generated captions (checked against the scene)", fontsize=8)
    axes[0].legend(fontsize=7)
    axes[1].set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(nll_keys))],
                       [k.removeprefix("reference_nll").strip("_") or "references" for k in nll_keys],
                       fontsize=6, rotation=20)
    axes[1].set_ylabel("nats / token")
    axes[1].set_title("NLL of the reference long captions", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
