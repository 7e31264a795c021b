"""Triton backend of the fused contrastive loss (see :mod:`.contrastive` for the maths, kernels/README.md for why).

* ``contrastive_fwd_kernel``: one program per (row block, column split), in grouped order (GROUP_M row blocks
  share each column split, so resident programs reuse row slabs and column tiles from L2). A program sweeps its
  columns tile by tile, recomputing ``s = scale * a @ b.T`` with D tiled by BLOCK_K, and keeps an online (max, sum)
  log-sum-exp per row in fp32, the positive logit, and (global mode) each column's (max, log-sum) over the block's
  rows. The partial results are a few [splits, n] / [row_blocks, m] fp32 vectors merged in torch.
* ``contrastive_grad_kernel``: one program per logit tile of a row chunk: recomputes ``s``, forms
  ``G = coef * (P_row [+ P_col] - n_diag * onehot)`` with ``P = exp((s - max) - logsum)``, writes the tile's
  ``sum G * x`` (the ``logit_scale`` gradient) per 64-column unit, and stores ``2^e G`` in the compute dtype. The
  power of two ``2^e`` (:func:`._lse.g_store_scale`) puts the largest possible ``|G|`` at 2^14, so the 16-bit
  copy neither overflows nor underflows whatever N, the scale or the upstream gradient are.
* ``scaled_matmul_kernel``: ``C (+)= alpha * X @ Y`` with fp32 accumulation and ``alpha = grad * scale / 2^e`` read
  from device memory (no host sync). Per row chunk: ``dA[chunk] = alpha G B`` written in the gradient dtype, and
  ``dB += alpha G^T A[chunk]`` into one fp32 [m, D] accumulator. One recompute + two products: with the forward,
  4 units of N^2 D in all, and the G tile is written once.

All kernels are autotuned on sm_90 (``*_TILES``; keyed on D, the dtypes and the precision) and run one fixed
configuration under the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._lse import g_store_scale, merge_stats
from ._triton_common import (
    DOT_FP32,
    INTERPRET,
    TileConfigs,
    autotune,
    cast_rtne,
    config,
    device_guard,
    dot_precision,
    grouped_tile,
    launch,
    logit_block_mk,
    tiles_grid,
)

CHUNK_ELEMENTS = 1 << 25  # G chunk of the backward: [rows, m] with rows * m <= 32M (64 MiB in bf16)
COL_PARTIAL_ELEMENTS = 1 << 24  # forward column partials [row_blocks, m] per launch (64 MiB fp32)
GROUP_M = 8  # row blocks per band of the grouped schedule
MIN_SPLITS = 2 if INTERPRET else 16  # column splits of the forward: >= 16 so a band of 8 row blocks fills 128 SMs
DS_UNIT = 32 if INTERPRET else 64  # column unit of the dscale partials; every BLOCK_N is a multiple of it

# sm_90 configurations (aot.py compiles every one; none spills registers). The logit kernels hold a [BLOCK_M, BLOCK_N]
# fp32 tile plus its exp() temporaries: with 16-bit operands (BLOCK_M = 128, BLOCK_K = 64) BLOCK_N = 256, and 128
# with 4 warps, spill; TF32 operands take twice the registers and shared memory, leaving 64-wide tiles on 8 warps;
# IEEE fp32 runs on FMA units with BLOCK_M = 64, BLOCK_K = 32, where 64-wide tiles on 8 warps spill a few bytes. The
# matmul with an fp32 accumulator to read back (ACCUMULATE) spills at BLOCK_N = 256.
_LOGIT_TC = [config(w, s, BLOCK_N=64) for w in (4, 8) for s in (3, 4)] + [config(8, s, BLOCK_N=128) for s in (3, 4)]
_LOGIT_TF32 = [c for c in _LOGIT_TC if c.num_warps == 8 and c.kwargs["BLOCK_N"] == 64]
_LOGIT_FMA = [config(4, s, BLOCK_N=64) for s in (3, 4)] + [config(8, s, BLOCK_N=128) for s in (3, 4)]
_LOGIT_FMA_FWD = _LOGIT_FMA[:2]  # the forward's online statistics add registers: 128-wide spills with triton 3.6

FWD_TILES = TileConfigs(
    gpu=_LOGIT_TC,
    tf32=_LOGIT_TF32,
    fma=_LOGIT_FMA_FWD,
    interpret=config(4, 1, BLOCK_N=64),  # 64x64: the fastest tile under the numpy interpreter (measured)
    smem_operands=lambda m: [(m["BLOCK_M"], m["BLOCK_K"]), (m["BLOCK_N"], m["BLOCK_K"])],
    key=["K", "COL_STATS", "PRECISION"],
)
GRAD_TILES = TileConfigs(
    gpu=_LOGIT_TC,
    tf32=_LOGIT_TF32,
    fma=_LOGIT_FMA,
    interpret=config(4, 1, BLOCK_N=64),
    smem_operands=lambda m: [(m["BLOCK_M"], m["BLOCK_K"]), (m["BLOCK_N"], m["BLOCK_K"])],
    key=["K", "HAS_COL", "NEED_DSCALE", "STORE_G", "PRECISION"],
)
MATMUL_TILES = TileConfigs(
    gpu=[config(w, s, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64) for w in (4, 8) for s in (3, 4)]
    + [config(8, s, BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64) for bn in (128, 256) for s in (3, 4)],
    fma=[config(w, 3, BLOCK_M=64, BLOCK_N=bn, BLOCK_K=32) for bn in (64, 128) for w in (4, 8)],
    interpret=config(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
    smem_operands=lambda m: [(m["BLOCK_M"], m["BLOCK_K"]), (m["BLOCK_K"], m["BLOCK_N"])],
    key=["N", "ACCUMULATE", "PRECISION"],
    operand="X",
    restore_value=["C"],  # tuning runs the kernel repeatedly: an accumulating launch must not add up the runs
    exclude=lambda meta: meta["ACCUMULATE"] and meta["BLOCK_N"] > 128,
)


@triton.jit
def _logit_tile(A, B, offs_m, offs_n, mask_m, mask_n, K, stride_am, stride_bn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """x = a[offs_m] @ b[offs_n].T in fp32, D tiled by BLOCK_K. Rows are unit-stride (the host guarantees it); the
    row offsets are int64 (offs_m / offs_n come from int64 program ids), so N * D may pass 2^31.  -> [BM, BN]"""
    x = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(A + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        b = tl.load(B + offs_n[None, :] * stride_bn + offs_k[:, None],
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # [BK, BN]
        if DOT_FP32:  # interpreter only (constexpr: compiled away on GPU)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        x = tl.dot(a, b, x, input_precision=PRECISION)
    return x


# Per-launch offsets and counts are not specialised on (divisibility by 16, == 1): they change from launch to launch
# and chunk to chunk, and would otherwise multiply the compiled variants (and the AOT check) for no faster code.


@autotune(FWD_TILES)
@triton.jit(do_not_specialize=["row_start", "label_offset", "splits"])
def contrastive_fwd_kernel(
    A, B, SCALE, ROW_MAX, ROW_LOGSUM, ROW_POS, COL_MAX, COL_LOGSUM, M, N, K, row_start, label_offset, splits,
    stride_am, stride_bn,
    COL_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, split = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), splits, GROUP_M)
    scale = tl.load(SCALE).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of this launch (int64)
    mask_m = offs_m < M
    target = row_start + offs_m + label_offset  # [BM] column of each row's positive pair
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    tiles_per_split = tl.cdiv(tl.cdiv(N, BLOCK_N), splits)
    col_begin = split * tiles_per_split * BLOCK_N
    col_end = tl.minimum(col_begin + tiles_per_split * BLOCK_N, N)
    for n0 in range(col_begin, col_end, BLOCK_N):  # an empty range (more splits than tiles) leaves -inf stats
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [BN]; int64 even where n0 is an int32 loop index
        mask_n = offs_n < N
        x = _logit_tile(A, B, offs_m, offs_n, mask_m, mask_n, K, stride_am, stride_bn,
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


@autotune(GRAD_TILES)
@triton.jit(do_not_specialize=["row_start", "diag_offset", "ds_cols"])
def contrastive_grad_kernel(
    A, B, SCALE, ROW_STATS, COL_STATS, G, DSCALE, coef, diag_coef, g_scale, M, N, K, row_start, diag_offset,
    ds_cols, stride_am, stride_bn, stride_gm, stride_row_stats, stride_col_stats,
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, NEED_DSCALE: tl.constexpr, STORE_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DS_UNIT: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    scale = tl.load(SCALE).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of this chunk (int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_m = offs_m < M
    mask_n = offs_n < N
    x = _logit_tile(A, B, offs_m, offs_n, mask_m, mask_n, K, stride_am, stride_bn,
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
    g = tl.where(valid, coef * p - tl.where(is_pos, diag_coef, 0.0), 0.0)  # [BM, BN] d loss / d logits, fp32
    if NEED_DSCALE:  # sum G * x per DS_UNIT columns: the partials' layout does not depend on BLOCK_N
        gx = tl.reshape(tl.sum(g * x, axis=0), [BLOCK_N // DS_UNIT, DS_UNIT])
        unit = pid_n * (BLOCK_N // DS_UNIT) + tl.arange(0, BLOCK_N // DS_UNIT)
        tl.store(DSCALE + pid_m * ds_cols + unit, tl.sum(gx, axis=1), mask=unit < ds_cols)
    if STORE_G:  # 2^e G: |G| <= diag_coef, and 2^e * diag_coef <= 2^14 keeps fp16 in range (see g_store_scale)
        tl.store(G + offs_m[:, None] * stride_gm + offs_n[None, :], cast_rtne(g * g_scale, G.dtype.element_ty),
                 mask=valid)


@autotune(MATMUL_TILES)
@triton.jit
def scaled_matmul_kernel(
    X, Y, C, ALPHA, M, N, K, stride_xm, stride_xk, stride_yk, stride_yn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """C[M, N] = alpha * X[M, K] @ Y[K, N] (+ C if ACCUMULATE), fp32 accumulation, stored in C's dtype."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int64
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # K runs over up to N rows of B: int64
        mask_k = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        y = tl.load(Y + offs_k[:, None] * stride_yk + offs_n[None, :] * stride_yn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    acc = acc * tl.load(ALPHA)
    valid = mask_m[:, None] & mask_n[None, :]
    c_ptrs = C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=valid, other=0.0).to(tl.float32)
    tl.store(c_ptrs, cast_rtne(acc, C.dtype.element_ty), mask=valid)


def scaled_matmul(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor,
                  accumulate: bool = False) -> torch.Tensor:
    """``out (+)= alpha * x @ y`` with fp32 accumulation. x [M, K], y [K, N] (same dtype, any strides), out [M, N]
    (any float dtype; fp32 when accumulating across calls), alpha: one-element fp32 device tensor."""
    m, k = x.shape
    n = y.shape[1]
    if m == 0 or n == 0:
        return out
    with device_guard(x):
        launch(scaled_matmul_kernel, lambda meta: (tiles_grid(m, n, meta["BLOCK_M"], meta["BLOCK_N"])[2],),
               x, y, out, alpha, m, n, k, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
               out.stride(0), out.stride(1),
               ACCUMULATE=accumulate, GROUP_M=GROUP_M, DOT_FP32=DOT_FP32, PRECISION=dot_precision(x.dtype))
    return out


AOT_SM_COUNT = 132  # H100 SXM / H200: the SM count aot.py's recording assumes (host code on CPU, no interpreter)


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of the tensor's device (none under the interpreter; AOT_SM_COUNT when aot.py runs
    the host code on CPU tensors to record the launches an H100 would get)."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return 0 if INTERPRET else AOT_SM_COUNT


def _column_splits(t: torch.Tensor, row_blocks: int, m: int) -> int:
    """Column splits of the forward grid: at least MIN_SPLITS (a band of GROUP_M row blocks then shares each
    column tile from L2), more when there are too few row blocks to fill the GPU, never more 64-column tiles."""
    programs = 2 * sm_count(t)
    return max(1, min(triton.cdiv(m, 64), max(MIN_SPLITS, triton.cdiv(programs, row_blocks))))


class TritonBackend:
    """Implements :class:`.contrastive.Backend` with the three kernels above. Inputs: [rows, D] with unit stride
    along D (the autograd function makes them so) in the compute dtype."""

    def forward_stats(self, a, b, scale, offset, col_stats, chunk):
        n, k = a.shape
        m = b.shape[0]
        precision = dot_precision(a.dtype)
        bm, bk = logit_block_mk(k, a.dtype, precision)
        row = torch.empty(2, n, dtype=torch.float32, device=a.device)
        pos = torch.empty(n, dtype=torch.float32, device=a.device)
        col = torch.full((2, m), float("-inf"), dtype=torch.float32, device=a.device) if col_stats else None
        # rows per launch bounded so the [row_blocks, m] column partials stay under COL_PARTIAL_ELEMENTS
        rows_per_launch = max(1, COL_PARTIAL_ELEMENTS // max(m, 1)) * bm if col_stats else n
        for r0 in range(0, n, rows_per_launch):
            rows = min(rows_per_launch, n - r0)
            row_blocks = triton.cdiv(rows, bm)
            splits = _column_splits(a, row_blocks, m)
            row_part = torch.empty(3, splits, rows, dtype=torch.float32, device=a.device)  # max, logsum, pos
            col_part = torch.empty(2, row_blocks, m, dtype=torch.float32, device=a.device) if col_stats else None
            a_rows = a[r0:r0 + rows]
            with device_guard(a):
                launch(contrastive_fwd_kernel, (row_blocks * splits,),
                       a_rows, b, scale, row_part[0], row_part[1], row_part[2],
                       col_part[0] if col_stats else scale, col_part[1] if col_stats else scale,
                       rows, m, k, r0, offset, splits, a_rows.stride(0), b.stride(0),
                       COL_STATS=col_stats, BLOCK_M=bm, BLOCK_K=bk, GROUP_M=GROUP_M,
                       DOT_FP32=DOT_FP32, PRECISION=precision)
            row[:, r0:r0 + rows] = merge_stats(row_part[0], row_part[1])
            pos[r0:r0 + rows] = row_part[2].sum(dim=0)  # only the split holding the positive adds a nonzero
            if col_stats:
                part = merge_stats(col_part[0], col_part[1])
                col = merge_stats(torch.stack([col[0], part[0]]), torch.stack([col[1], part[1]]))
        return row, pos, col

    def backward_system(self, a, b, row, col, scale, grad, coef, n_diag, offset, need_a, need_b, need_scale, chunk,
                        out_dtype):
        n, k = a.shape
        m = b.shape[0]
        dtype = a.dtype
        precision = dot_precision(dtype)
        bm, bk = logit_block_mk(k, dtype, precision)
        store_g = need_a or need_b
        g_scale = g_store_scale(coef, n_diag)
        # everything that depends on the upstream gradient stays fp32 and on the device (no host sync)
        alpha = (grad * scale / g_scale).to(torch.float32).reshape(1)
        da = torch.empty(n, k, dtype=out_dtype, device=a.device) if need_a else None
        db32 = torch.zeros(m, k, dtype=torch.float32, device=a.device) if need_b else None
        dscale = torch.zeros((), dtype=torch.float32, device=a.device)
        chunk = chunk or max(bm, min(n, CHUNK_ELEMENTS // max(m, 1)))
        ds_cols = triton.cdiv(m, DS_UNIT)
        for r0 in range(0, n, chunk):
            rows = min(chunk, n - r0)
            grid_m = triton.cdiv(rows, bm)
            g = torch.empty(rows, m, dtype=dtype, device=a.device) if store_g else scale
            partial = torch.empty(grid_m * ds_cols if need_scale else 1, dtype=torch.float32, device=a.device)
            a_rows = a[r0:r0 + rows]
            with device_guard(a):
                launch(contrastive_grad_kernel,
                       lambda meta, rows=rows: (tiles_grid(rows, m, bm, meta["BLOCK_N"])[2],),
                       a_rows, b, scale, row if row is not None else scale, col if col is not None else scale,
                       g, partial, float(coef), float(n_diag * coef), float(g_scale), rows, m, k, r0, offset,
                       ds_cols, a_rows.stride(0), b.stride(0), g.stride(0) if store_g else 0,
                       row.stride(0) if row is not None else 0, col.stride(0) if col is not None else 0,
                       HAS_ROW=row is not None, HAS_COL=col is not None, NEED_DSCALE=need_scale, STORE_G=store_g,
                       BLOCK_M=bm, BLOCK_K=bk, DS_UNIT=DS_UNIT, GROUP_M=GROUP_M,
                       DOT_FP32=DOT_FP32, PRECISION=precision)
            if need_scale:
                dscale += partial.sum()
            if need_a:  # dA[chunk] = alpha G B, written once in the gradient dtype
                scaled_matmul(g, b, da[r0:r0 + rows], alpha)
            if need_b:  # dB += alpha G^T A[chunk], accumulated in fp32
                scaled_matmul(g.T, a_rows, db32, alpha, accumulate=True)
        db = None
        if need_b:
            db = db32 if out_dtype == torch.float32 else db32.to(out_dtype)
        return da, db, (dscale * grad if need_scale else None)
