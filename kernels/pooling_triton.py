"""Triton last-token pooling + L2 norm: one program per row finds the last nonzero mask entry, gathers that
hidden state and normalises it in fp32; the backward writes ``dx = r * (g - y <y, g>)`` at the pooled position.

Imported lazily by :mod:`.pooling`; the derivation is in kernels/README.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import INTERPRET, device_guard, next_pow2
from .pooling import NORM_EPS, _raise_empty_rows


@triton.jit
def _last_index(MASK, row, T, stride_mb, stride_mt, BLOCK_T: tl.constexpr):
    best = tl.full([BLOCK_T], -1, dtype=tl.int64)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)  # [BT]
        m = tl.load(MASK + row * stride_mb + offs_t * stride_mt, mask=offs_t < T, other=0)
        best = tl.maximum(best, tl.where(m != 0, offs_t, -1))
    return tl.max(best, axis=0)


@triton.jit
def last_token_pool_fwd_kernel(
    H, MASK, OUT, IDX, T, D,
    stride_hb, stride_ht, stride_hd, stride_mb, stride_mt, stride_ob,
    NORMALIZE: tl.constexpr, EPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    last = _last_index(MASK, row, T, stride_mb, stride_mt, BLOCK_T)
    tl.store(IDX + row, last)
    src = H + row * stride_hb + tl.maximum(last, 0) * stride_ht
    dst = OUT + row * stride_ob
    # a row with no valid token gets NaN (the host raises on it before anyone can use the output)
    bad = tl.where(last >= 0, 1.0, float("nan"))
    if D <= BLOCK_D:  # the whole row in registers: read it once
        offs_d = tl.arange(0, BLOCK_D)
        x = tl.load(src + offs_d * stride_hd, mask=offs_d < D, other=0.0).to(tl.float32)  # [BD]
        scale = bad
        if NORMALIZE:
            scale = bad / tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)), EPS)
        tl.store(dst + offs_d, (x * scale).to(OUT.dtype.element_ty), mask=offs_d < D)
    else:
        scale = bad
        if NORMALIZE:
            ss = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                x = tl.load(src + offs_d * stride_hd, mask=offs_d < D, other=0.0).to(tl.float32)
                ss += x * x
            scale = bad / tl.maximum(tl.sqrt(tl.sum(ss, axis=0)), EPS)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(src + offs_d * stride_hd, mask=offs_d < D, other=0.0).to(tl.float32)
            tl.store(dst + offs_d, (x * scale).to(OUT.dtype.element_ty), mask=offs_d < D)


@triton.jit
def last_token_pool_bwd_kernel(
    H, IDX, G, DH, D,
    stride_hb, stride_ht, stride_hd, stride_gb, stride_gd, stride_db, stride_dt,
    NORMALIZE: tl.constexpr, EPS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    last = tl.load(IDX + row)
    src = H + row * stride_hb + last * stride_ht
    grd = G + row * stride_gb
    dst = DH + row * stride_db + last * stride_dt
    if not NORMALIZE:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            g = tl.load(grd + offs_d * stride_gd, mask=offs_d < D, other=0.0)
            tl.store(dst + offs_d, g.to(DH.dtype.element_ty), mask=offs_d < D)
    elif D <= BLOCK_D:
        offs_d = tl.arange(0, BLOCK_D)
        x = tl.load(src + offs_d * stride_hd, mask=offs_d < D, other=0.0).to(tl.float32)
        g = tl.load(grd + offs_d * stride_gd, mask=offs_d < D, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=0))
        rnorm = 1.0 / tl.maximum(norm, EPS)
        # y = x r, r = 1/max(|x|, eps):  dx = r g - r^3 x <x, g>  (the second term vanishes when |x| < eps)
        coef = tl.where(norm > EPS, rnorm * rnorm * rnorm * tl.sum(x * g, axis=0), 0.0)
        tl.store(dst + offs_d, (rnorm * g - coef * x).to(DH.dtype.element_ty), mask=offs_d < D)
    else:
        ss = tl.zeros([BLOCK_D], dtype=tl.float32)
        xg = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(src + offs_d * stride_hd, mask=offs_d < D, other=0.0).to(tl.float32)
            g = tl.load(grd + offs_d * stride_gd, mask=offs_d < D, other=0.0).to(tl.float32)
            ss += x * x
            xg += x * g
        norm = tl.sqrt(tl.sum(ss, axis=0))
        rnorm = 1.0 / tl.maximum(norm, EPS)
        coef = tl.where(norm > EPS, rnorm * rnorm * rnorm * tl.sum(xg, axis=0), 0.0)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(src + offs_d * stride_hd, mask=offs_d < D, other=0.0).to(tl.float32)
            g = tl.load(grd + offs_d * stride_gd, mask=offs_d < D, other=0.0).to(tl.float32)
            tl.store(dst + offs_d, (rnorm * g - coef * x).to(DH.dtype.element_ty), mask=offs_d < D)


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
    """hidden [B, T, D], mask [B, T] -> [B, D]; saves hidden (no copy) and the [B] indices for backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, mask: torch.Tensor, normalize: bool) -> torch.Tensor:
        b, t, d = hidden.shape
        out = torch.empty(b, d, dtype=hidden.dtype, device=hidden.device)
        idx = torch.empty(b, dtype=torch.int64, device=hidden.device)
        if b and d:
            m = _as_loadable_mask(mask)
            block_d = _block_d(d)
            with device_guard(hidden):
                last_token_pool_fwd_kernel[(b,)](
                    hidden, m, out, idx, t, d,
                    hidden.stride(0), hidden.stride(1), hidden.stride(2), m.stride(0), m.stride(1), out.stride(0),
                    NORMALIZE=normalize, EPS=NORM_EPS, BLOCK_T=min(next_pow2(max(t, 1)), 1024), BLOCK_D=block_d,
                    num_warps=_num_warps(block_d),
                )
            _raise_empty_rows(idx)
        ctx.save_for_backward(hidden, idx)
        ctx.normalize = normalize
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, idx = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        b, t, d = hidden.shape
        grad_hidden = torch.zeros(b, t, d, dtype=hidden.dtype, device=hidden.device)
        if b and d:
            block_d = _block_d(d)
            with device_guard(hidden):
                last_token_pool_bwd_kernel[(b,)](
                    hidden, idx, grad_out, grad_hidden, d,
                    hidden.stride(0), hidden.stride(1), hidden.stride(2), grad_out.stride(0), grad_out.stride(1),
                    grad_hidden.stride(0), grad_hidden.stride(1),
                    NORMALIZE=ctx.normalize, EPS=NORM_EPS, BLOCK_D=block_d, num_warps=_num_warps(block_d),
                )
        return grad_hidden, None, None
