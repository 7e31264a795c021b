"""Triton backend of the fused contrastive loss (see :mod:`.contrastive` for the maths, kernels/README.md for why).

* ``contrastive_fwd_kernel``: one program per (row block, column split). It sweeps its columns tile by tile,
  recomputing ``s = scale * a @ b.T`` with D tiled by BLOCK_K, and keeps an online (max, sum) log-sum-exp per row
  in fp32, the positive logit, and (global mode) each column's (max, log-sum) over the block's rows. The partial
  results are a few [splits, n] / [row_blocks, m] fp32 vectors merged in torch; the logits never reach memory.
* ``contrastive_grad_kernel``: one program per logit tile of a row chunk: recomputes ``s``, forms
  ``G = coef * (P_row [+ P_col] - n_diag * onehot)`` with ``P = exp((s - max) - logsum)``, adds the tile's
  ``sum G * x`` (the ``logit_scale`` gradient), and writes ``scale * G`` for that chunk only. The dense products
  ``G @ b`` (dA) and, in a second pass over column chunks with the roles swapped, ``G^T @ a`` (dB) go to cuBLAS.
  A fully fused dA accumulator would be [BLOCK_M, D] fp32 (up to 1 MiB at D=4096): it cannot live on chip, and
  spilling it to HBM per tile costs far more traffic than the GEMMs (README, "Backward").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import DOT_FP32, INTERPRET, device_guard, dot_block_k
from .contrastive import merge_stats

CHUNK_ELEMENTS = 1 << 25  # G chunk of the backward: [rows, m] with rows * m <= 32M (64 MiB in bf16)
COL_PARTIAL_ELEMENTS = 1 << 24  # forward column partials [row_blocks, m] per launch (64 MiB fp32)


@triton.jit
def _logit_tile(A, B, offs_m, offs_n, mask_m, mask_n, K, stride_am, stride_ak, stride_bn, stride_bk,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """x = a[offs_m] @ b[offs_n].T in fp32, D tiled by BLOCK_K.  -> [BM, BN]"""
    x = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        b = tl.load(B + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # [BK, BN]
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        x = tl.dot(a, b, x, input_precision=PRECISION)
    return x


@triton.jit
def contrastive_fwd_kernel(
    A, B, SCALE, ROW_MAX, ROW_LOGSUM, ROW_POS, COL_MAX, COL_LOGSUM, M, N, K, row_start, label_offset, tiles_per_split,
    stride_am, stride_ak, stride_bn, stride_bk,
    COL_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    scale = tl.load(SCALE).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of this launch
    mask_m = offs_m < M
    target = row_start + offs_m + label_offset  # [BM] column of each row's positive pair
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    col_begin = split * tiles_per_split * BLOCK_N
    col_end = tl.minimum(col_begin + tiles_per_split * BLOCK_N, N)
    for n0 in range(col_begin, col_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN]
        mask_n = offs_n < N
        x = _logit_tile(A, B, offs_m, offs_n, mask_m, mask_n, K, stride_am, stride_ak, stride_bn, stride_bk,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        s = x * scale
        s_row = tl.where(mask_n[None, :], s, float("-inf"))
        pos_i += tl.sum(tl.where(offs_n[None, :] == target[:, None], s, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(s_row, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_row - m_new[:, None]), axis=1)
        m_i = m_new
        if COL_STATS:
            s_col = tl.where(mask_m[:, None], s, float("-inf"))
            c_max = tl.max(s_col, axis=0)  # [BN]; finite: every row block has a valid row
            c_sum = tl.sum(tl.exp(s_col - c_max[None, :]), axis=0)
            tl.store(COL_MAX + pid_m * N + offs_n, c_max, mask=mask_n)
            tl.store(COL_LOGSUM + pid_m * N + offs_n, tl.log(c_sum), mask=mask_n)
    # (max, log-sum) kept apart: max + log-sum would round away lse - s_pos near convergence (see merge_stats)
    tl.store(ROW_MAX + split * M + offs_m, m_i, mask=mask_m)
    tl.store(ROW_LOGSUM + split * M + offs_m, tl.log(l_i), mask=mask_m)
    tl.store(ROW_POS + split * M + offs_m, pos_i, mask=mask_m)


@triton.jit
def contrastive_grad_kernel(
    A, B, SCALE, ROW_STATS, COL_STATS, G, DSCALE, coef, diag_coef, M, N, K, row_start, diag_offset,
    stride_am, stride_ak, stride_bn, stride_bk, stride_gm, stride_gn, stride_row_stats, stride_col_stats,
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, NEED_DSCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    scale = tl.load(SCALE).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of this chunk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_m = offs_m < M
    mask_n = offs_n < N
    x = _logit_tile(A, B, offs_m, offs_n, mask_m, mask_n, K, stride_am, stride_ak, stride_bn, stride_bk,
                    BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
    s = x * scale
    p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_ROW:  # softmax over the row: exp((s - max) - logsum)
        r_max = tl.load(ROW_STATS + row_start + offs_m, mask=mask_m, other=0.0)
        r_log = tl.load(ROW_STATS + stride_row_stats + row_start + offs_m, mask=mask_m, other=0.0)
        p += tl.exp((s - r_max[:, None]) - r_log[:, None])
    if HAS_COL:
        c_max = tl.load(COL_STATS + offs_n, mask=mask_n, other=0.0)
        c_log = tl.load(COL_STATS + stride_col_stats + offs_n, mask=mask_n, other=0.0)
        p += tl.exp((s - c_max[None, :]) - c_log[None, :])
    is_pos = offs_n[None, :] == (row_start + offs_m + diag_offset)[:, None]
    valid = mask_m[:, None] & mask_n[None, :]
    g = tl.where(valid, coef * p - tl.where(is_pos, diag_coef, 0.0), 0.0)  # [BM, BN] d loss / d logits
    if NEED_DSCALE:
        tl.store(DSCALE + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(g * x, axis=1), axis=0))
    tl.store(G + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, (g * scale).to(G.dtype.element_ty),
             mask=valid)


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul precision setting, as cuBLAS does for ClipLoss: "highest" (default) -> IEEE fp32
    if dtype == torch.float32 and not INTERPRET and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _fwd_config(dim: int) -> dict:
    if INTERPRET:  # 64x64 tiles are the fastest under the numpy interpreter (measured: 2-3x faster than 32 or 128)
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": dot_block_k(dim, 64), "num_warps": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": dot_block_k(dim, 64), "num_warps": 8, "num_stages": 3}


def _grad_config(dim: int) -> dict:
    if INTERPRET:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": dot_block_k(dim, 64), "num_warps": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": dot_block_k(dim, 64), "num_warps": 8, "num_stages": 3}


def _column_splits(t: torch.Tensor, row_blocks: int, col_tiles: int) -> int:
    """Column splits of the forward grid: enough programs to fill the GPU when there are few row blocks."""
    if not t.is_cuda:  # interpreter: two splits whenever possible, so the tests exercise the merge
        return min(col_tiles, 2)
    programs = 2 * torch.cuda.get_device_properties(t.device).multi_processor_count
    return max(1, min(col_tiles, triton.cdiv(programs, row_blocks)))


def _mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y with an fp32 result (cuBLAS accumulates in fp32 and writes fp32 for 16-bit operands)."""
    if x.dtype == torch.float32:
        return x @ y
    if x.is_cuda:
        return torch.mm(x, y, out_dtype=torch.float32)
    return x.float() @ y.float()  # interpreter runs: CPU has no mixed-dtype mm


class TritonBackend:
    """Implements :class:`.contrastive.Backend` with the two kernels above (plus cuBLAS for dA and dB)."""

    def forward_stats(self, a, b, scale, offset, col_stats, chunk):
        n, k = a.shape
        m = b.shape[0]
        cfg = _fwd_config(k)
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        row = torch.empty(2, n, dtype=torch.float32, device=a.device)
        pos = torch.empty(n, dtype=torch.float32, device=a.device)
        col = torch.full((2, m), float("-inf"), dtype=torch.float32, device=a.device) if col_stats else None
        # rows per launch bounded so the [row_blocks, m] column partials stay under COL_PARTIAL_ELEMENTS
        rows_per_launch = max(1, COL_PARTIAL_ELEMENTS // max(m, 1)) * bm if col_stats else n
        col_tiles = triton.cdiv(m, bn)
        for r0 in range(0, n, rows_per_launch):
            rows = min(rows_per_launch, n - r0)
            row_blocks = triton.cdiv(rows, bm)
            tiles_per_split = triton.cdiv(col_tiles, _column_splits(a, row_blocks, col_tiles))
            splits = triton.cdiv(col_tiles, tiles_per_split)
            row_part = torch.empty(3, splits, rows, dtype=torch.float32, device=a.device)  # max, logsum, pos
            col_part = torch.empty(2, row_blocks, m, dtype=torch.float32, device=a.device) if col_stats else None
            a_rows = a[r0:r0 + rows]
            with device_guard(a):
                contrastive_fwd_kernel[(row_blocks, splits)](
                    a_rows, b, scale, row_part[0], row_part[1], row_part[2],
                    col_part[0] if col_stats else scale, col_part[1] if col_stats else scale,
                    rows, m, k, r0, offset, tiles_per_split,
                    a_rows.stride(0), a_rows.stride(1), b.stride(0), b.stride(1),
                    COL_STATS=col_stats, DOT_FP32=DOT_FP32, PRECISION=_precision(a.dtype), **cfg,
                )
            row[:, r0:r0 + rows] = merge_stats(row_part[0], row_part[1])
            pos[r0:r0 + rows] = row_part[2].sum(dim=0)  # only the split holding the positive adds a nonzero
            if col_stats:
                part = merge_stats(col_part[0], col_part[1])
                col = merge_stats(torch.stack([col[0], part[0]]), torch.stack([col[1], part[1]]))
        return row, pos, col

    def _grad_rows(self, a, b, row, col, scale, coef, diag_coef, diag_offset, need_scale, chunk, dtype):
        """Yields (row slice, scale * G chunk [rows, m] in ``dtype``, sum G * x over the chunk or None)."""
        n, k = a.shape
        m = b.shape[0]
        cfg = _grad_config(k)
        chunk = chunk or max(cfg["BLOCK_M"], min(n, CHUNK_ELEMENTS // max(m, 1)))
        for r0 in range(0, n, chunk):
            rows = min(chunk, n - r0)
            grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(m, cfg["BLOCK_N"]))
            g = torch.empty(rows, m, dtype=dtype, device=a.device)
            partial = torch.empty(grid[0] * grid[1] if need_scale else 1, dtype=torch.float32, device=a.device)
            a_rows = a[r0:r0 + rows]
            with device_guard(a):
                contrastive_grad_kernel[grid](
                    a_rows, b, scale, row if row is not None else scale, col if col is not None else scale,
                    g, partial, float(coef), float(diag_coef), rows, m, k, r0, diag_offset,
                    a_rows.stride(0), a_rows.stride(1), b.stride(0), b.stride(1), g.stride(0), g.stride(1),
                    row.stride(0) if row is not None else 0, col.stride(0) if col is not None else 0,
                    HAS_ROW=row is not None, HAS_COL=col is not None, NEED_DSCALE=need_scale,
                    DOT_FP32=DOT_FP32, PRECISION=_precision(a.dtype), **cfg,
                )
            yield slice(r0, r0 + rows), g, (partial.sum() if need_scale else None)

    def backward_system(self, a, b, row, col, scale, grad, coef, n_diag, offset, need_a, need_b, need_scale, chunk):
        dtype = a.dtype
        da = db = None
        dscale = torch.zeros((), dtype=torch.float32, device=a.device)
        if need_a or need_scale:
            da = torch.empty_like(a) if need_a else None
            for rows, g, part in self._grad_rows(a, b, row, col, scale, coef, n_diag * coef, offset,
                                                 need_scale, chunk, dtype):
                if need_scale:
                    dscale += part
                if need_a:
                    da[rows] = _mm(g, b).mul_(grad).to(dtype)
        if need_b:
            # transposed system: rows of b against a; the row/column LSE roles and the diagonal offset swap
            db = torch.empty_like(b)
            for rows, g, _ in self._grad_rows(b, a, col, row, scale, coef, n_diag * coef, -offset, False,
                                              chunk, dtype):
                db[rows] = _mm(g, a).mul_(grad).to(dtype)
        return da, db, (dscale * grad if need_scale else None)
