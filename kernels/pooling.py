"""Last-token pooling (+ optional L2 normalisation): the embedding of a sequence is the hidden state of its last
valid token, found from the attention mask so that left, right and mixed padding all work.

``last_token_index`` defines "last valid": the highest position whose mask entry is nonzero. A row with no
nonzero entry has no token to pool; that is an input error and raises ``ValueError`` naming the rows (checking
costs one host-device sync per call).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import OpRegistry, interpreter_only_reasons, no_reasons, triton_reasons

NORM_EPS = 1e-12  # as F.normalize


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
    Raises ``ValueError`` if a row is all zeros.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    positions = torch.arange(mask.shape[1], device=mask.device)
    idx = torch.where(mask != 0, positions, -1).amax(dim=1) if mask.shape[1] else \
        torch.full((mask.shape[0],), -1, dtype=torch.long, device=mask.device)
    _raise_empty_rows(idx)
    return idx


def last_token_pool_ref(hidden: Tensor, mask: Tensor, normalize: bool = True) -> Tensor:
    """Pure-torch reference (and CPU path): hidden [B, T, D], mask [B, T] -> [B, D] in hidden's dtype.

    The norm is taken in fp32 (``F.normalize`` semantics, eps 1e-12); autograd provides the backward.
    """
    _check_inputs(hidden, mask)
    idx = last_token_index(mask)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if normalize:
        pooled = F.normalize(pooled.float(), dim=-1, eps=NORM_EPS).to(hidden.dtype)
    return pooled


def _last_token_pool_triton(hidden: Tensor, mask: Tensor, normalize: bool = True) -> Tensor:
    from . import pooling_triton

    return pooling_triton.LastTokenPoolFunction.apply(hidden, mask, normalize)


def _triton_pool_reasons(hidden: Tensor, mask: Tensor, normalize: bool = True) -> list[str]:
    reasons = triton_reasons((hidden, mask))
    if mask.is_complex():
        reasons.append(f"mask dtype {mask.dtype} not supported")
    return reasons


LAST_TOKEN_POOL = OpRegistry("last_token_pool")
LAST_TOKEN_POOL.register("triton", _last_token_pool_triton, _triton_pool_reasons,
                         lambda hidden, mask, *_: interpreter_only_reasons((hidden, mask)))
LAST_TOKEN_POOL.register("reference", last_token_pool_ref, no_reasons)


def last_token_pool(hidden: Tensor, mask: Tensor, normalize: bool = True, impl: str = "auto") -> Tensor:
    """Hidden state of each row's last valid token, optionally L2-normalised, in one kernel on GPU.

    Args:
        hidden: [B, T, D] hidden states (fp32, fp16 or bf16; any strides).
        mask: [B, T] attention mask (bool, int or float; nonzero = attended). Left, right or mixed padding.
        normalize: divide by ``max(||x||, 1e-12)`` computed in fp32.
        impl: ``"auto"`` (Triton on CUDA tensors, reference elsewhere), ``"triton"`` or ``"reference"``.

    Returns:
        [B, D] in hidden's dtype; differentiable w.r.t. ``hidden``.
    """
    _check_inputs(hidden, mask)
    return LAST_TOKEN_POOL.select(impl, hidden, mask, normalize).fn(hidden, mask, normalize)
