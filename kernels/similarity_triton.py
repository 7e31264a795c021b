"""Triton similarity kernel: one [BLOCK_M, BLOCK_N] tile of ``scale * normalize(a) @ normalize(b).T`` per program.

The row norms are accumulated from the same tiles the dot product loads (no normalised copies of the inputs);
the product and the scores are fp32. Imported lazily by :mod:`.similarity`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import DOT_FP32, INTERPRET, device_guard, dot_block_k


@triton.jit
def similarity_fwd_kernel(
    A, B, OUT, scale, M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    NORM_A: tl.constexpr, NORM_B: tl.constexpr, EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ss_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    ss_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        b = tl.load(B + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # [BK, BN]
        if NORM_A:
            a32 = a.to(tl.float32)
            ss_a += tl.sum(a32 * a32, axis=1)
        if NORM_B:
            b32 = b.to(tl.float32)
            ss_b += tl.sum(b32 * b32, axis=0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    acc = acc * scale
    if NORM_A:
        acc = acc / tl.maximum(tl.sqrt(ss_a), EPS)[:, None]
    if NORM_B:
        acc = acc / tl.maximum(tl.sqrt(ss_b), EPS)[None, :]
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc,
             mask=mask_m[:, None] & mask_n[None, :])


def _config(dim: int) -> dict:
    if INTERPRET:  # small tiles keep the numpy-emulated programs cheap and exercise the edge masks
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": dot_block_k(dim, 64), "num_warps": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": dot_block_k(dim, 64), "num_warps": 8, "num_stages": 3}


def similarity_fwd(a: torch.Tensor, b: torch.Tensor, scale: float, normalize_a: bool, normalize_b: bool
                   ) -> torch.Tensor:
    """[Q, D], [G, D] (same dtype and device) -> [Q, G] fp32 scores."""
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=a.device)
    if m == 0 or n == 0:
        return out
    cfg = _config(k)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    with device_guard(a):
        similarity_fwd_kernel[grid](
            a, b, out, float(scale), m, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            NORM_A=normalize_a, NORM_B=normalize_b, EPS=1e-12, DOT_FP32=DOT_FP32, **cfg,
        )
    return out
