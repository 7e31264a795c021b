"""Last-token pooling (+ optional L2 normalisation): the embedding of a sequence is the hidden state of its last
valid token, found from the attention mask so that left, right and mixed padding all work.

``last_token_index`` defines "last valid": the highest position whose mask entry is nonzero. A row with no
nonzero entry has no token to pool; that is an input error. ``last_token_index`` always raises ``ValueError`` naming
the rows; ``last_token_pool`` raises where the check is free (CPU tensors) and, on CUDA, returns a NaN row instead
unless ``check=True``: the check needs the device's answer on the host, a sync per call that a training step
should not pay (the model's sequences always end in prompt tokens, so its masks have no empty rows).

``impl="auto"`` runs the torch path on every device: the Triton kernel does the same reads and writes in one launch
instead of about nine, which saves some tens of microseconds per call, nothing measurable next to the LLM forward
it follows (kernels/README.md, "Last-token pooling: is the kernel worth it"). ``impl="triton"`` runs it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import OpRegistry, interpreter_only_reasons, no_reasons, triton_reasons
from ._pool_index import NORM_EPS, _last_index


def _check_inputs(hidden: Tensor, mask: Tensor) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    if mask.dim() != 2 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(hidden.shape[:2])} to match hidden, got {tuple(mask.shape)}")
    if mask.device != hidden.device:
        raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be floating point, got {hidden.dtype}")


def _raise_empty_rows(idx: Tensor) -> None:
    empty = (idx < 0).nonzero().flatten()
    if empty.numel():
        rows = empty[:8].tolist()
        more = f" (and {empty.numel() - 8} more)" if empty.numel() > 8 else ""
        raise ValueError(f"mask rows {rows}{more} have no nonzero entry, so there is no last token to pool; "
                         "every sequence needs at least one attended token")


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last nonzero entry of each mask row. [B, T] (any dtype) -> LongTensor [B].

    Padding-side agnostic: ``[0, 0, 1, 1] -> 3``, ``[1, 1, 0, 0] -> 1``, ``[0, 1, 1, 0] -> 2``.
    Raises ``ValueError`` if a row is all zeros (one host sync on CUDA).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    idx = _last_index(mask)
    _raise_empty_rows(idx)
    return idx


def should_check(check: bool | None, t: Tensor) -> bool:
    """``check=None``: check for empty rows only where it costs no host sync (tensors not on a CUDA device)."""
    return (not t.is_cuda) if check is None else bool(check)


def last_token_pool_ref(hidden: Tensor, mask: Tensor, normalize: bool = True, check: bool | None = None) -> Tensor:
    """Pure-torch path: hidden [B, T, D], mask [B, T] -> [B, D] in hidden's dtype.

    The norm is taken in fp32 (``F.normalize`` semantics, eps 1e-12); autograd provides the backward, and saves the
    [B] indices and the pooled [B, D] rows, never ``hidden``. An all-zero mask row raises (``check``, see
    :func:`should_check`) or gives a NaN row.
    """
    _check_inputs(hidden, mask)
    idx = _last_index(mask)
    checked = should_check(check, mask)
    if checked:
        _raise_empty_rows(idx)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx.clamp(min=0)]
    if normalize:
        pooled = F.normalize(pooled.float(), dim=-1, eps=NORM_EPS).to(hidden.dtype)
    if not checked:
        pooled = torch.where((idx >= 0)[:, None], pooled, torch.full_like(pooled[:1], float("nan")))
    return pooled


def _last_token_pool_triton(hidden: Tensor, mask: Tensor, normalize: bool = True, check: bool | None = None
                            ) -> Tensor:
    from . import pooling_triton

    out, idx = pooling_triton.LastTokenPoolFunction.apply(hidden, mask, normalize)
    if should_check(check, mask):
        _raise_empty_rows(idx)
    return out


def _triton_pool_reasons(hidden: Tensor, mask: Tensor, normalize: bool = True) -> list[str]:
    reasons = triton_reasons((hidden, mask))
    if mask.is_complex():
        reasons.append(f"mask dtype {mask.dtype} not supported")
    return reasons


LAST_TOKEN_POOL = OpRegistry("last_token_pool")
# the torch path first: auto takes it everywhere (the kernel saves nothing measurable, see the module docstring)
LAST_TOKEN_POOL.register("reference", last_token_pool_ref, no_reasons)
LAST_TOKEN_POOL.register("triton", _last_token_pool_triton, _triton_pool_reasons,
                         lambda hidden, mask, *_: interpreter_only_reasons((hidden, mask)))


def last_token_pool(hidden: Tensor, mask: Tensor, normalize: bool = True, impl: str = "auto",
                    check: bool | None = None) -> Tensor:
    """Hidden state of each row's last valid token, optionally L2-normalised.

    Args:
        hidden: [B, T, D] hidden states (fp32, fp16 or bf16; any strides).
        mask: [B, T] attention mask (bool, int or float; nonzero = attended). Left, right or mixed padding.
        normalize: divide by ``max(||x||, 1e-12)`` computed in fp32.
        impl: ``"auto"`` (the torch path, on every device), ``"triton"`` (one kernel; CUDA, or CPU under
            ``TRITON_INTERPRET=1``) or ``"reference"``.
        check: raise ``ValueError`` on a mask row with no nonzero entry. None (default): only where that costs no
            host sync (CPU tensors); on CUDA such a row comes back as NaN. True: always (one sync). False: never.

    Returns:
        [B, D] in hidden's dtype; differentiable w.r.t. ``hidden``. Neither path keeps ``hidden`` alive for backward.
    """
    _check_inputs(hidden, mask)
    return LAST_TOKEN_POOL.select(impl, hidden, mask, normalize).fn(hidden, mask, normalize, check)
