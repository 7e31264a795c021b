"""Triton kernels with pure-torch references, installed as ``vladva_openclip.kernels``.

Every op has a pure-torch reference (the CPU path and the ground truth), a Triton kernel for CUDA tensors, and a
dispatcher: ``impl="auto"`` runs Triton on CUDA tensors and the reference elsewhere (pooling: the torch path
everywhere, the kernel saves nothing measurable), ``impl="triton"`` raises :class:`KernelNotSupportedError` listing
why an input cannot take the kernel, ``impl="reference"`` forces the reference. Triton itself is imported only when
a Triton path runs. Precision follows torch's settings (autocast, TF32): kernels/README.md, "Precision modes", which
also has the derivations.

Ops: :func:`last_token_index`, :func:`last_token_pool`, :func:`contrastive_loss` / :class:`FusedClipLoss`,
:func:`similarity`, :func:`similarity_topk`. :func:`not_supported_reasons` says why an implementation would not run.
"""
from __future__ import annotations

from ._dispatch import KernelNotSupportedError, OpRegistry, triton_available, triton_interpret
from .clip_loss import FusedClipLoss
from .contrastive import CONTRASTIVE_LOSS, contrastive_loss
from .pooling import LAST_TOKEN_POOL, last_token_index, last_token_pool, last_token_pool_ref
from .similarity import SIMILARITY, similarity, similarity_ref, similarity_topk

OPS: dict[str, OpRegistry] = {r.op: r for r in (LAST_TOKEN_POOL, CONTRASTIVE_LOSS, SIMILARITY)}


def not_supported_reasons(op: str, impl: str, *args, **kwargs) -> list[str]:
    """Why ``impl`` of ``op`` cannot run on these inputs (empty list: it can).

    The arguments are the op's dispatch inputs: ``last_token_pool``: (hidden, mask); ``similarity``: (a, b);
    ``contrastive_loss``: (image, text, logit_scale, all_image | None, all_text | None).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose one of {sorted(OPS)}")
    return OPS[op].not_supported_reasons(impl, *args, **kwargs)


__all__ = [
    "CONTRASTIVE_LOSS",
    "LAST_TOKEN_POOL",
    "OPS",
    "SIMILARITY",
    "FusedClipLoss",
    "KernelNotSupportedError",
    "contrastive_loss",
    "last_token_index",
    "last_token_pool",
    "last_token_pool_ref",
    "not_supported_reasons",
    "similarity",
    "similarity_ref",
    "similarity_topk",
    "triton_available",
    "triton_interpret",
]
