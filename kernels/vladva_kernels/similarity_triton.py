"""Triton similarity kernel: one [BLOCK_M, BLOCK_N] tile of ``scale * normalize(a) @ normalize(b).T`` per program.

The row norms are accumulated from the same tiles the dot product loads (no normalised copies of the inputs);
the product and the scores are fp32 (an fp32 product in TF32 when torch allows it for CUDA matmuls). Programs are
numbered on grid dimension 0 (up to 2^31 - 1 of them; dimension 1 stops at 65,535) in grouped order, and a gallery
that would need more programs than that is scored in slices. Imported lazily by :mod:`.similarity`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import (
    DOT_FP32,
    INTERPRET,
    MAX_GRID_PROGRAMS,
    TileConfigs,
    autotune,
    config,
    device_guard,
    dot_block_k,
    dot_precision,
    grouped_tile,
    is_fma_dot,
    launch,
    tiles_grid,
)

GROUP_M = 8
_SIM_TC = [config(w, s, BLOCK_M=128, BLOCK_N=64) for w in (4, 8) for s in (3, 4)] + \
    [config(8, s, BLOCK_M=128, BLOCK_N=bn) for bn in (128, 256) for s in (3, 4)]
SIM_TILES = TileConfigs(
    # 16-bit operands: 4 warps spill registers on sm_90 (aot.py) from BLOCK_N = 128 on (64 in TF32, whose operands
    # take twice the space). IEEE fp32 runs on FMA units with 64-row tiles and BLOCK_K = 32 (the host's choice);
    # smaller ones spill there.
    gpu=_SIM_TC,
    tf32=[c for c in _SIM_TC if c.num_warps == 8 and c.kwargs["BLOCK_N"] <= 128],
    fma=[config(8, s, BLOCK_M=64, BLOCK_N=128) for s in (3, 4)],
    interpret=config(4, 1, BLOCK_M=32, BLOCK_N=32),  # small tiles keep the interpreter cheap, exercise edge masks
    smem_operands=lambda m: [(m["BLOCK_M"], m["BLOCK_K"]), (m["BLOCK_N"], m["BLOCK_K"])],
    key=["K", "NORM_A", "NORM_B", "PRECISION"],
)
_SMALLEST_TILE = (32, 32)  # gallery slices are sized so that even this tile's grid fits grid dimension 0


@autotune(SIM_TILES)
@triton.jit
def similarity_fwd_kernel(
    A, B, OUT, scale, M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    NORM_A: tl.constexpr, NORM_B: tl.constexpr, EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] int64
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] int64
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ss_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    ss_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
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
        if DOT_FP32:  # interpreter only (constexpr: compiled away on GPU)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    acc = acc * scale
    if NORM_A:
        acc = acc / tl.maximum(tl.sqrt(ss_a), EPS)[:, None]
    if NORM_B:
        acc = acc / tl.maximum(tl.sqrt(ss_b), EPS)[None, :]
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc,
             mask=mask_m[:, None] & mask_n[None, :])


def gallery_slices(q: int, g: int, max_programs: int = MAX_GRID_PROGRAMS) -> list[tuple[int, int]]:
    """[start, end) gallery slices, each small enough that every configuration's grid fits ``max_programs``
    (the CUDA limit of grid dimension 0): one slice unless Q x G is astronomically large."""
    rows = triton.cdiv(q, _SMALLEST_TILE[0])
    cols_per_slice = max(1, max_programs // max(rows, 1)) * _SMALLEST_TILE[1]
    return [(s, min(g, s + cols_per_slice)) for s in range(0, g, cols_per_slice)]


def similarity_fwd(a: torch.Tensor, b: torch.Tensor, scale: float, normalize_a: bool, normalize_b: bool,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """[Q, D], [G, D] (same dtype and device) -> [Q, G] fp32 scores (written into ``out`` when given)."""
    m, k = a.shape
    n = b.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32, device=a.device)
    elif out.shape != (m, n) or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 [{m}, {n}] tensor, got {out.dtype} {tuple(out.shape)}")
    if m == 0 or n == 0:
        return out
    # unit stride along D lets the compiler vectorise the loads (the JIT specialises stride 1); copies are O(rows D)
    a, b = (t if t.stride(1) == 1 else t.contiguous() for t in (a, b))
    precision = dot_precision(a.dtype)
    block_k = dot_block_k(k, 32 if is_fma_dot(a.dtype, precision) and not INTERPRET else 64)
    for start, end in gallery_slices(m, n):
        b_part, out_part = b[start:end], out[:, start:end]
        cols = end - start
        with device_guard(a):
            launch(similarity_fwd_kernel, lambda meta, cols=cols: (tiles_grid(m, cols, meta["BLOCK_M"], meta["BLOCK_N"])[2],),
                   a, b_part, out_part, float(scale), m, cols, k,
                   a.stride(0), a.stride(1), b_part.stride(0), b_part.stride(1), out_part.stride(0),
                   out_part.stride(1),
                   NORM_A=normalize_a, NORM_B=normalize_b, EPS=1e-12, BLOCK_K=block_k, GROUP_M=GROUP_M,
                   DOT_FP32=DOT_FP32, PRECISION=precision)
    return out
