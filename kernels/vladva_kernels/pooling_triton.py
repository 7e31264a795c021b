"""Triton last-token pooling + L2 norm: one program per row finds the last nonzero mask entry, gathers that
hidden state and normalises it in fp32; the backward writes ``dx = r * (g - y <y, g>)`` at the pooled position,
from the saved output, norms and indices (O(B) saved; ``hidden`` is not kept alive).

Imported lazily by :mod:`.pooling` (``impl="triton"``); the derivation is in kernels/README.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._pool_index import NORM_EPS
from ._pool_index import _last_index as _last_index_torch
from ._triton_common import INTERPRET, cast_rtne, device_guard, launch, next_pow2


@triton.jit
def _mask_last_index(MASK, row, T, stride_mb, stride_mt, BLOCK_T: tl.constexpr):
    """Highest t with MASK[row, t] != 0, or -1 (int64). Positions are int32 (T < 2^31), the row offset int64."""
    best = tl.full([BLOCK_T], -1, dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)  # [BT]
        m = tl.load(MASK + row * stride_mb + offs_t.to(tl.int64) * stride_mt, mask=offs_t < T, other=0)
        best = tl.maximum(best, tl.where(m != 0, offs_t, -1))
    return tl.max(best, axis=0).to(tl.int64)


@triton.jit
def last_token_pool_fwd_kernel(
    H, MASK, OUT, IDX, NORM, T, D,
    stride_hb, stride_ht, stride_hd, stride_mb, stride_mt, stride_ob,
    NORMALIZE: tl.constexpr, EPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    last = _mask_last_index(MASK, row, T, stride_mb, stride_mt, BLOCK_T)
    tl.store(IDX + row, last)
    src = H + row * stride_hb + tl.maximum(last, 0) * stride_ht  # int64: B * T * D may pass 2^31
    dst = OUT + row * stride_ob
    # a row with no valid token gets NaN (the host raises on it when the caller asked for the check)
    bad = tl.where(last >= 0, 1.0, float("nan"))
    if D <= BLOCK_D:  # the whole row in registers: read it once
        offs_d = tl.arange(0, BLOCK_D)
        x = tl.load(src + offs_d * stride_hd, mask=offs_d < D, other=0.0).to(tl.float32)  # [BD]
        scale = bad
        if NORMALIZE:
            norm = tl.sqrt(tl.sum(x * x, axis=0))
            tl.store(NORM + row, norm)
            scale = bad / tl.maximum(norm, EPS)
        tl.store(dst + offs_d, cast_rtne(x * scale, OUT.dtype.element_ty), mask=offs_d < D)
    else:
        scale = bad
        if NORMALIZE:
            ss = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                x = tl.load(src + offs_d * stride_hd, mask=offs_d < D, other=0.0).to(tl.float32)
                ss += x * x
            norm = tl.sqrt(tl.sum(ss, axis=0))
            tl.store(NORM + row, norm)
            scale = bad / tl.maximum(norm, EPS)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(src + offs_d * stride_hd, mask=offs_d < D, other=0.0).to(tl.float32)
            tl.store(dst + offs_d, cast_rtne(x * scale, OUT.dtype.element_ty), mask=offs_d < D)


@triton.jit
def last_token_pool_bwd_kernel(
    Y, NORM, IDX, G, DH, D,
    stride_yb, stride_gb, stride_gd, stride_db, stride_dt,
    NORMALIZE: tl.constexpr, EPS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """From the saved output y = x r (r = 1 / max(|x|, eps)) and |x|: dx = r (g - y <y, g>), written at the pooled
    position; the rest of d hidden is the caller's zero fill. Rows with no valid token (idx -1) write nothing."""
    row = tl.program_id(0).to(tl.int64)
    last = tl.load(IDX + row)
    ok = last >= 0
    grd = G + row * stride_gb
    ysrc = Y + row * stride_yb
    dst = DH + row * stride_db + tl.maximum(last, 0) * stride_dt  # int64
    if not NORMALIZE:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            g = tl.load(grd + offs_d * stride_gd, mask=offs_d < D, other=0.0)
            tl.store(dst + offs_d, cast_rtne(g.to(tl.float32), DH.dtype.element_ty), mask=(offs_d < D) & ok)
    else:
        norm = tl.load(NORM + row)
        rnorm = 1.0 / tl.maximum(norm, EPS)
        yg = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            y = tl.load(ysrc + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            g = tl.load(grd + offs_d * stride_gd, mask=offs_d < D, other=0.0).to(tl.float32)
            yg += y * g
        # below eps, r = 1/eps is a constant and the projection term vanishes (autograd through F.normalize agrees)
        proj = tl.where(norm > EPS, tl.sum(yg, axis=0), 0.0)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            y = tl.load(ysrc + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            g = tl.load(grd + offs_d * stride_gd, mask=offs_d < D, other=0.0).to(tl.float32)
            tl.store(dst + offs_d, cast_rtne(rnorm * (g - y * proj), DH.dtype.element_ty), mask=(offs_d < D) & ok)


def _block_d(dim: int) -> int:
    # GPU: rows up to 8192 wide stay in registers (one read); the interpreter uses 256 so the tests also cover
    # the multi-tile loop with D = 300 / 1000 / 4096
    return min(next_pow2(dim), 256 if INTERPRET else 8192)


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 2048 else 8


def _as_loadable_mask(mask: torch.Tensor) -> torch.Tensor:
    # triton cannot dereference torch.bool pointers portably; a uint8 view has the same bytes
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


class LastTokenPoolFunction(torch.autograd.Function):
    """hidden [B, T, D], mask [B, T] -> (pooled [B, D], idx [B] int64, not differentiable).

    Saves for backward the [B] indices, the [B] fp32 norms and the output itself (the caller holds it anyway):
    O(B) extra memory, never ``hidden``. No host sync: empty rows come back as NaN with idx -1.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, mask: torch.Tensor, normalize: bool):
        b, t, d = hidden.shape
        out = torch.empty(b, d, dtype=hidden.dtype, device=hidden.device)
        idx = torch.empty(b, dtype=torch.int64, device=hidden.device)
        norm = torch.empty(b if normalize else 1, dtype=torch.float32, device=hidden.device)
        if b and d:
            m = _as_loadable_mask(mask)
            block_d = _block_d(d)
            # mask rows are scanned 512 entries at a time: 1024 made ptxas spill in one fp32 variant (aot.py)
            with device_guard(hidden):
                launch(last_token_pool_fwd_kernel, (b,),
                       hidden, m, out, idx, norm, t, d,
                       hidden.stride(0), hidden.stride(1), hidden.stride(2), m.stride(0), m.stride(1), out.stride(0),
                       NORMALIZE=normalize, EPS=NORM_EPS, BLOCK_T=min(next_pow2(max(t, 1)), 512), BLOCK_D=block_d,
                       num_warps=_num_warps(block_d))
        elif b:
            idx.copy_(_last_index_torch(mask))
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(out if normalize else None, norm if normalize else None, idx)
        ctx.shape, ctx.dtype, ctx.normalize = (b, t, d), hidden.dtype, normalize
        return out, idx

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_idx=None):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        out, norm, idx = ctx.saved_tensors
        b, t, d = ctx.shape
        # the dense zero fill is the only large write, and a dense gradient of hidden needs it
        grad_hidden = torch.zeros(b, t, d, dtype=ctx.dtype, device=grad_out.device)
        if b and d:
            block_d = _block_d(d)
            y = out if out is not None else grad_out  # unused without normalisation
            with device_guard(grad_out):
                launch(last_token_pool_bwd_kernel, (b,),
                       y, norm if norm is not None else grad_out, idx, grad_out, grad_hidden, d,
                       y.stride(0), grad_out.stride(0), grad_out.stride(1), grad_hidden.stride(0),
                       grad_hidden.stride(1),
                       NORMALIZE=ctx.normalize, EPS=NORM_EPS, BLOCK_D=block_d, num_warps=_num_warps(block_d))
        return grad_hidden, None, None
