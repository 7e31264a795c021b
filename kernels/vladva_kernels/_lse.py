"""Log-sum-exp bookkeeping and the 16-bit G scaling, shared by the contrastive loss's reference and Triton backends.

A floor below both (:mod:`.contrastive` and :mod:`.contrastive_triton` import it), so neither imports the other.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

G_STORE_MAX_EXPONENT = 14  # 2^e |G| <= 2^14: fp16's largest finite value is 65504 ~ 2^16


def g_store_scale(coef: float, n_diag: int) -> float:
    """Power of two ``2^e`` by which the backward scales G before storing it in a 16-bit dtype.

    ``|G_ij| = |coef (P_ij [+ Q_ij]) - n_diag coef delta_ij| <= n_diag * coef`` (P, Q in [0, 1]). Choosing the largest
    ``2^e`` with ``2^e n_diag coef <= 2^14`` puts the largest possible entry just under fp16's range whatever N is,
    so entries down to 2^-24 below it stay normal fp16 numbers, and nothing that is rounded to 16 bits depends on the
    upstream gradient (GradScaler's 2^16) or on ``logit_scale``: those multiply the fp32 product afterwards, as
    ``grad * scale / 2^e``, which is exact for powers of two. bf16 has fp32's range and is unaffected either way.
    """
    bound = n_diag * coef
    if not bound > 0:
        raise ValueError(f"G bound must be positive, got {bound}")
    mantissa, exponent = math.frexp(bound)  # bound = mantissa * 2^exponent, mantissa in [0.5, 1)
    if mantissa == 0.5:  # bound is a power of two itself
        exponent -= 1
    return math.ldexp(1.0, G_STORE_MAX_EXPONENT - exponent)


def merge_stats(maxes: Tensor, logsums: Tensor, dim: int = 0) -> Tensor:
    """Combine partial log-sum-exps given as (max, log sum exp(s - max)) along ``dim`` -> [2, ...] (max, logsum).

    A log-sum-exp is kept as two numbers instead of ``max + logsum``: a logit near 100 has an fp32 ulp of 8e-6, so
    folding the two together would cost ``lse - s_pos`` (often ~1e-3 near convergence) several digits; kept apart,
    ``(max - s_pos) + logsum`` is exact when the positive is the row maximum, as in ``F.cross_entropy``.
    """
    top = maxes.amax(dim=dim, keepdim=True)
    shift = torch.where(torch.isneginf(top), torch.zeros_like(top), top)  # all -inf: keep -inf, avoid nan
    logsum = torch.logsumexp(logsums + (maxes - shift), dim=dim)
    return torch.stack([top.squeeze(dim), logsum])


def row_terms(stats: Tensor, pos: Tensor) -> Tensor:
    """lse - s_pos for each row, computed as (max - s_pos) + logsum (see :func:`merge_stats`)."""
    return (stats[0] - pos) + stats[1]
