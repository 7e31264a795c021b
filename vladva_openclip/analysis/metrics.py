"""The numbers behind the paper's analyses: entropy, explained variance / effective rank, rank correlation.

All functions are pure and work on tensors (CPU or GPU); results that leave the module are float64 for
reporting. Natural logarithms throughout (entropies are in nats).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "components_for",
    "cumulative_explained_variance",
    "distribution_entropy",
    "entropy_from_logits",
    "explained_variance_ratio",
    "fractional_ranks",
    "permutation_pvalue",
    "spearman",
]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along the last dimension.

    Args:
        logits: ``[..., V]``; computed in fp32 whatever the input dtype (bf16 logits of a 32k vocabulary lose
            the tail otherwise). ``-inf`` logits are allowed (zero probability contributes 0).

    Returns:
        ``[...]`` fp32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * logp.nan_to_num(neginf=0.0)).sum(-1)


def distribution_entropy(weights: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Entropy (nats) of non-negative weights along the last dimension, ``0 log 0 = 0``.

    Args:
        weights: ``[..., N]`` attention weights over N positions (any non-negative mass).
        normalize: rescale each row to sum to 1 first (attention restricted to image tokens does not sum to 1).

    Returns:
        ``[...]`` fp32; a row with no mass gets 0.
    """
    w = weights.float().clamp_min(0)
    if normalize:
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / total.clamp_min(torch.finfo(torch.float32).tiny), w)
    return -(w * torch.where(w > 0, w.log(), torch.zeros_like(w))).sum(-1)


def explained_variance_ratio(embeddings: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Fraction of the total variance along each principal component, largest first (PCA of the rows).

    Args:
        embeddings: ``[N, D]``, one row per item (N >= 2).
        center: subtract the mean row (PCA); False analyses the raw second moment.

    Returns:
        ``[min(N, D)]`` float64, non-increasing, summing to 1 (all zeros when every row is the same).
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"explained variance needs an [N, D] matrix with N >= 2 rows, got {tuple(embeddings.shape)}")
    x = embeddings.double()
    if center:
        x = x - x.mean(0, keepdim=True)
    s2 = torch.linalg.svdvals(x).pow(2)
    total = s2.sum()
    return (s2 / total).cpu() if total > 0 else torch.zeros_like(s2).cpu()


def cumulative_explained_variance(embeddings: torch.Tensor, center: bool = True) -> torch.Tensor:
    """``cev[k-1]``: variance explained by the first k principal components, ``[min(N, D)]`` float64."""
    return explained_variance_ratio(embeddings, center=center).cumsum(0)


def components_for(cev: torch.Tensor, fraction: float, tol: float = 1e-9) -> int:
    """The smallest k whose first k components explain at least ``fraction`` of the variance (0 if there is no
    variance at all). This count at 0.9 / 0.99 is what the report calls the effective rank."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if cev.numel() == 0 or float(cev[-1]) <= 0.0:
        return 0
    hit = (cev >= fraction - tol).nonzero()
    return int(hit[0, 0]) + 1 if hit.numel() else int(cev.numel())


def fractional_ranks(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties given the mean of the ranks they span (the convention of Spearman's rho)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    sorted_x = x[order]
    i, n = 0, x.numel()
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson's r of the fractional ranks (NaN if either side is constant)."""
    rx, ry = fractional_ranks(x), fractional_ranks(y)
    if rx.numel() != ry.numel():
        raise ValueError(f"spearman: {rx.numel()} values vs {ry.numel()}")
    if rx.numel() < 2:
        return float("nan")
    return _pearson(rx, ry)


def permutation_pvalue(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor,
                       permutations: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of Spearman's rho under random pairing: the share of ``permutations`` shuffles of ``y``
    (seeded, so reports are reproducible) whose |rho| reaches the observed one, with the observed pairing counted
    (never 0). NaN when rho is undefined."""
    rx, ry = fractional_ranks(x), fractional_ranks(y)
    observed = spearman(rx, ry)
    if math.isnan(observed):
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    perms = torch.argsort(torch.rand(permutations, ry.numel(), generator=gen), dim=1)
    a = rx - rx.mean()
    b = (ry - ry.mean())[perms]
    rho = (b @ a) / math.sqrt(float((a * a).sum()) * float((ry - ry.mean()).pow(2).sum()))
    hits = int((rho.abs() >= abs(observed) - 1e-12).sum())
    return (hits + 1) / (permutations + 1)
