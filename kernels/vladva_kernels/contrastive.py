"""Fused symmetric InfoNCE (CLIP) loss that never builds the N x N logit matrix.

Two modes, mirroring open_clip's ``ClipLoss`` (``open_clip/loss.py``):

* **global** (``world_size == 1``, or gathered features without ``local_loss``): image [N, D] and text [N, D];
  ``loss = (CE(s * I T^T, arange) + CE(s * T I^T, arange)) / 2``, the two cross-entropies each a mean over rows.
* **local** (``local_loss=True``): this rank's rows ``image_features`` / ``text_features`` [n, D] against the gathered
  ``all_text_features`` / ``all_image_features`` [N, D], labels ``arange(n) + label_offset`` (``rank * n``);
  ``loss = (CE(s * I_loc T_all^T) + CE(s * T_loc I_all^T)) / 2``.

Both are computed from per-row (and, in global mode, per-column) log-sum-exps accumulated tile by tile in fp32; the
backward recomputes the logit tiles. ``logit_scale`` is the already exponentiated scale, as open_clip passes it; its
gradient is returned. ``logit_bias`` (SigLIP-style models pass one) is accepted for signature compatibility: a
softmax cross-entropy is invariant to adding one constant to every logit, so the loss does not depend on it and its
gradient is exactly zero (ClipLoss returns rounding noise of order 1e-9 there). The loss is returned in fp32
whatever the feature dtype (ClipLoss returns the logits' dtype). See kernels/README.md for the derivations.

The implementation is split into two primitives per "system" (one logit matrix ``scale * a @ b.T``):
``forward_stats`` (row LSE, positive logit, optional column LSE) and ``backward_system`` (dA, dB, dscale). The
reference backend implements them in chunked torch; the Triton backend in :mod:`.contrastive_triton`.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ._dispatch import OpRegistry, interpreter_only_reasons, no_reasons, triton_reasons
from ._lse import G_STORE_MAX_EXPONENT, g_store_scale, merge_stats, row_terms  # noqa: F401 - re-exported


class Backend(Protocol):
    def forward_stats(self, a: Tensor, b: Tensor, scale: Tensor, offset: int, col_stats: bool, chunk: int | None
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
        """a [n, D], b [m, D] -> (row stats [2, n], positive logit s[i, i + offset] [n], column stats [2, m] | None).

        Stats are (max, log sum exp(s - max)) pairs in fp32, see :func:`merge_stats`.
        """

    def backward_system(self, a: Tensor, b: Tensor, row: Tensor, col: Tensor | None, scale: Tensor, grad: Tensor,
                        coef: float, n_diag: int, offset: int, need_a: bool, need_b: bool, need_scale: bool,
                        chunk: int | None, out_dtype: torch.dtype
                        ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Gradients through ``sum_ij G_ij s_ij`` with ``G = coef * (P_row [+ P_col] - n_diag * onehot(offset))``,
        times the upstream ``grad``; dA, dB in ``out_dtype`` (the features' dtype, which autocast may have lowered
        for the computation)."""


def default_chunk(dim: int) -> int:
    """Rows per reference chunk: about D / 3 (a multiple of 32 in [32, 4096]).

    The chunk's three [chunk, N] fp32 buffers then take at most half of what the two [N, D] fp32 gradients need
    anyway, so peak memory stays O(N * D), while the chunk GEMMs keep an inner dimension large enough for BLAS to
    run near its peak (a fixed small chunk made the dB accumulation ``addmm_`` the bottleneck at D = 4096).
    """
    return max(32, min(4096, dim // 3 // 32 * 32))


def _shifted_exp_(s: Tensor, shift: Tensor, logsum: Tensor | None = None) -> Tensor:
    """In place: ``exp((s - shift) - logsum)`` (shift/logsum broadcast), keeping the subtraction order of
    :func:`merge_stats` so a logit equal to its max gives exactly ``exp(-logsum)``."""
    s.sub_(shift)
    if logsum is not None:
        s.sub_(logsum)
    return s.exp_()


class ReferenceBackend:
    """Pure torch, chunked over rows: O(chunk * N) temporaries (at most three [chunk, N] fp32 buffers) on top of
    the gradients themselves. Every elementwise step runs in place, so the memory bound is the chunk, not N^2.

    ``g_dtype`` (default None: G stays fp32) rounds each G chunk to that dtype after the :func:`g_store_scale`
    normalisation, exactly where the Triton backward stores it, and runs the products on the rounded values in fp32
    (what tensor cores compute). Tests use it to check the Triton path's rounding order at sizes the interpreter
    cannot reach.
    """

    def __init__(self, g_dtype: torch.dtype | None = None):
        self.g_dtype = g_dtype

    def forward_stats(self, a, b, scale, offset, col_stats, chunk):
        n, m = a.shape[0], b.shape[0]
        chunk = chunk or default_chunk(a.shape[1])
        b32 = b.float()
        row = torch.empty(2, n, dtype=torch.float32, device=a.device)
        pos = torch.empty(n, dtype=torch.float32, device=a.device)
        col = torch.full((2, m), float("-inf"), dtype=torch.float32, device=a.device) if col_stats else None
        for r0 in range(0, n, chunk):
            s = (a[r0:r0 + chunk].float() @ b32.T).mul_(scale)  # [c, m] logits of this row chunk
            c = s.shape[0]
            rows = torch.arange(c, device=a.device)
            pos[r0:r0 + c] = s[rows, rows + r0 + offset]
            r_max = s.amax(dim=1)
            row[0, r0:r0 + c] = r_max
            row[1, r0:r0 + c] = _shifted_exp_(s.clone(), r_max[:, None]).sum(dim=1).log_()
            if col_stats:
                c_max = s.amax(dim=0)
                c_log = _shifted_exp_(s, c_max[None, :]).sum(dim=0).log_()
                col = merge_stats(torch.stack([col[0], c_max]), torch.stack([col[1], c_log]))
        return row, pos, col

    def backward_system(self, a, b, row, col, scale, grad, coef, n_diag, offset, need_a, need_b, need_scale, chunk,
                        out_dtype):
        n, m = a.shape[0], b.shape[0]
        chunk = chunk or default_chunk(a.shape[1])
        b32 = b.float()
        da = torch.empty(a.shape, dtype=out_dtype, device=a.device) if need_a else None
        db32 = torch.zeros(m, b.shape[1], dtype=torch.float32, device=b.device) if need_b else None
        dscale = torch.zeros((), dtype=torch.float32, device=a.device)
        g_scale = g_store_scale(coef, n_diag) if self.g_dtype is not None else 1.0
        alpha = grad * scale / g_scale  # d logits -> d features carries the scale (and undoes the G normalisation)
        for r0 in range(0, n, chunk):
            a32 = a[r0:r0 + chunk].float()
            x = a32 @ b32.T  # [c, m] unscaled dot products
            c = x.shape[0]
            p = _shifted_exp_(x * scale, row[0, r0:r0 + c, None], row[1, r0:r0 + c, None])
            if col is not None:
                p += _shifted_exp_(x * scale, col[0, None, :], col[1, None, :])
            p.mul_(coef)
            rows = torch.arange(c, device=a.device)
            p[rows, rows + r0 + offset] -= coef * n_diag  # p is now G (before the upstream grad)
            if need_scale:
                dscale += torch.dot(p.view(-1), x.view(-1))
            del x
            if self.g_dtype is not None:  # the Triton backward's 16-bit G: 2^e G rounded, products in fp32
                p = p.mul_(g_scale).to(self.g_dtype).float()
            if need_a:
                da[r0:r0 + c] = (p @ b32).mul_(alpha).to(out_dtype)
            if need_b:
                db32.addmm_(p.T, a32)
        db = db32.mul_(alpha).to(out_dtype) if need_b else None
        return da, db, (dscale * grad if need_scale else None)


def _prepare(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Features in the compute dtype with unit stride along D (rows may keep any stride): kernels index D directly."""
    if t is None:
        return None
    t = t.to(dtype)
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


class ContrastiveLossFunction(torch.autograd.Function):
    """(backend, chunk, label_offset, compute_dtype, logit_scale, image, text, all_image | None, all_text | None)
    -> fp32 loss. The features are cast to ``compute_dtype`` (autocast's dtype, or their own) for the logits; the
    gradients come back in the features' own dtype, computed from fp32 accumulators (never rounded to the compute
    dtype on the way)."""

    @staticmethod
    def forward(ctx, backend, chunk, label_offset, compute_dtype, logit_scale, image, text, all_image, all_text):
        scale = logit_scale.detach().to(torch.float32).reshape(())
        n = image.shape[0]
        ctx.out_dtype = image.dtype
        image, text, all_image, all_text = (_prepare(t, compute_dtype) for t in (image, text, all_image, all_text))
        with torch.autocast(image.device.type, enabled=False):
            if all_image is None:
                row, pos, col = backend.forward_stats(image, text, scale, 0, True, chunk)
                loss = (row_terms(row, pos).sum() + row_terms(col, pos).sum()) / (2 * n)
                ctx.save_for_backward(image, text, scale, row, col)
            else:
                row1, pos1, _ = backend.forward_stats(image, all_text, scale, label_offset, False, chunk)
                row2, pos2, _ = backend.forward_stats(text, all_image, scale, label_offset, False, chunk)
                loss = (row_terms(row1, pos1).sum() + row_terms(row2, pos2).sum()) / (2 * n)
                ctx.save_for_backward(image, text, all_image, all_text, scale, row1, row2)
        ctx.backend, ctx.chunk, ctx.offset, ctx.local = backend, chunk, label_offset, all_image is not None
        ctx.scale_shape, ctx.scale_dtype = logit_scale.shape, logit_scale.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        need = ctx.needs_input_grad  # (backend, chunk, offset, dtype, scale, image, text, all_image, all_text)
        backend, chunk, out = ctx.backend, ctx.chunk, ctx.out_dtype
        grad = grad_loss.detach().to(torch.float32).reshape(())
        with torch.autocast(grad.device.type, enabled=False):
            if not ctx.local:
                image, text, scale, row, col = ctx.saved_tensors
                coef = 1.0 / (2 * image.shape[0])
                d_img, d_txt, dscale = backend.backward_system(
                    image, text, row, col, scale, grad, coef, 2, 0, need[5], need[6], need[4], chunk, out)
                d_all_img = d_all_txt = None
            else:
                image, text, all_image, all_text, scale, row1, row2 = ctx.saved_tensors
                coef = 1.0 / (2 * image.shape[0])
                d_img, d_all_txt, ds1 = backend.backward_system(
                    image, all_text, row1, None, scale, grad, coef, 1, ctx.offset, need[5], need[8], need[4], chunk,
                    out)
                d_txt, d_all_img, ds2 = backend.backward_system(
                    text, all_image, row2, None, scale, grad, coef, 1, ctx.offset, need[6], need[7], need[4], chunk,
                    out)
                dscale = ds1 + ds2 if need[4] else None
        if dscale is not None:
            dscale = dscale.reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return None, None, None, None, dscale, d_img, d_txt, d_all_img, d_all_txt


def _triton_backend():
    from . import contrastive_triton

    return contrastive_triton.TritonBackend()


def _run(backend_factory):
    def run(image, text, logit_scale, all_image, all_text, label_offset, chunk, compute_dtype):
        return ContrastiveLossFunction.apply(backend_factory(), chunk, label_offset, compute_dtype, logit_scale, image,
                                             text, all_image, all_text)
    return run


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(features: Tensor) -> torch.dtype:
    """The dtype the logits are computed from: autocast's lower-precision dtype when autocast is on for the
    features' device (as it is for ClipLoss's matmuls, so ``torch.autocast(dtype=torch.bfloat16)`` runs the kernels
    in bf16 on tensor cores), else the features' own dtype. Accumulation, logits and the loss stay fp32."""
    device = features.device.type
    if features.dtype in _AUTOCAST_ELIGIBLE and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return features.dtype


def _triton_contrastive_reasons(image, text, logit_scale, all_image, all_text) -> list[str]:
    return triton_reasons((image, text, all_image, all_text, logit_scale))


CONTRASTIVE_LOSS = OpRegistry("contrastive_loss")
CONTRASTIVE_LOSS.register("triton", _run(_triton_backend), _triton_contrastive_reasons,
                          lambda image, text, scale, *features: interpreter_only_reasons((image, text, *features)))
CONTRASTIVE_LOSS.register("reference", _run(ReferenceBackend), no_reasons)


def _as_scale(logit_scale, like: Tensor) -> Tensor:
    if not isinstance(logit_scale, Tensor):
        return torch.tensor(float(logit_scale), dtype=torch.float32, device=like.device)
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar (one element), got shape {tuple(logit_scale.shape)}")
    if logit_scale.device != like.device:
        if logit_scale.requires_grad:
            raise ValueError(f"logit_scale is on {logit_scale.device} but the features are on {like.device}")
        logit_scale = logit_scale.to(like.device)
    return logit_scale


def _validate(image: Tensor, text: Tensor, all_image: Tensor | None, all_text: Tensor | None, label_offset: int
              ) -> None:
    named = {"image_features": image, "text_features": text}
    if (all_image is None) != (all_text is None):
        raise ValueError("local loss needs both all_image_features and all_text_features (the gathered features), "
                         "or neither for the global loss")
    if all_image is not None:
        named.update(all_image_features=all_image, all_text_features=all_text)
    for name, t in named.items():
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
            desc = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D floating-point tensor [rows, dim], got {desc}")
    dims = {name: t.shape[1] for name, t in named.items()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"all features must share the embedding dim, got {dims}")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"all features must share one dtype, got {dtypes}")
    devices = {name: str(t.device) for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all features must be on one device, got {devices}")
    n = image.shape[0]
    if n == 0:
        raise ValueError("empty batch: image_features has no rows")
    if text.shape[0] != n:
        raise ValueError(f"image_features and text_features must have the same number of rows (pairs), got {n} "
                         f"and {text.shape[0]}")
    if all_image is None:
        if label_offset != 0:
            raise ValueError("label_offset is only meaningful for the local loss: pass all_image_features and "
                             "all_text_features (the gathered features) as well")
        return
    n_all = all_image.shape[0]
    if all_text.shape[0] != n_all:
        raise ValueError(f"all_image_features and all_text_features must have the same rows, got {n_all} and "
                         f"{all_text.shape[0]}")
    if not 0 <= label_offset <= n_all - n:
        raise ValueError(f"label_offset must be in [0, {n_all - n}] so the {n} local labels index the {n_all} "
                         f"gathered rows (open_clip uses rank * local_batch), got {label_offset}")


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                     logit_bias: Tensor | float | None = None, *, label_offset: int = 0,
                     all_image_features: Tensor | None = None, all_text_features: Tensor | None = None,
                     chunk_size: int | None = None, impl: str = "auto") -> Tensor:
    """Symmetric InfoNCE exactly as open_clip's ``ClipLoss``, without materialising the logit matrix.

    Args:
        image_features: [n, D] (global mode: all N rows; local mode: this rank's rows). fp32, fp16 or bf16.
        text_features: [n, D], paired row by row with ``image_features``.
        logit_scale: the exponentiated scale (``model.logit_scale.exp()``), a one-element tensor or a float;
            receives a gradient if it requires one.
        logit_bias: optional one-element bias; the loss is invariant to it (see the module docstring) and its
            gradient is zero.
        label_offset: local mode only: index of this rank's first row in the gathered features (``rank * n``).
        all_image_features, all_text_features: local mode only: the gathered [N, D] features, as returned by
            ``open_clip.loss.gather_features(..., local_loss=True)``.
        chunk_size: rows per chunk of the backward (and reference) passes; default from a memory budget.
        impl: ``"auto"`` (Triton on CUDA tensors, reference elsewhere), ``"triton"`` or ``"reference"``.

    Precision (kernels/README.md, "Precision modes"): the logits are products of the features in the compute dtype
    (:func:`compute_dtype`: autocast's 16-bit dtype inside ``torch.autocast``, else the features' dtype) accumulated
    in fp32; an fp32 product is IEEE unless torch allows TF32 for CUDA matmuls (``allow_tf32`` /
    ``set_float32_matmul_precision("high")``), as for cuBLAS. Log-sum-exps, the loss and every accumulator are fp32;
    gradients come back in the features' own dtype.

    Returns:
        0-d float32 loss.
    """
    _validate(image_features, text_features, all_image_features, all_text_features, label_offset)
    scale = _as_scale(logit_scale, image_features)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chosen = CONTRASTIVE_LOSS.select(impl, image_features, text_features, scale, all_image_features,
                                     all_text_features)
    loss = chosen.fn(image_features, text_features, scale, all_image_features, all_text_features, int(label_offset),
                     chunk_size, compute_dtype(image_features))
    if isinstance(logit_bias, Tensor):
        if logit_bias.numel() != 1:
            raise ValueError(f"logit_bias must be a scalar (one element), got shape {tuple(logit_bias.shape)}; "
                             "a per-logit bias is not supported")
        if logit_bias.requires_grad:
            # exact: d loss / d bias = sum_ij (P_ij - onehot_ij) / n = 0; keeps the bias in the graph (DDP sees it)
            loss = loss + logit_bias.sum().to(loss.device, torch.float32) * 0.0
    return loss
