"""Retrieval scoring: ``similarity`` (scaled cosine/dot products, fp32) and ``similarity_topk`` (gallery in tiles).

Both are forward-only scoring ops for evaluation (no autograd through the Triton path; the reference path is plain
torch and differentiable if someone needs it). Scores are always float32, whatever the input dtype: bf16 logits
are 0.25-0.5 apart at CLIP scale and would reorder near-ties.

Top-k tie-breaking is deterministic and documented: results are sorted by score descending, and among equal
scores the LOWER gallery index comes first (this also decides which of several tied items make the cut at the
k-th place). NaN scores rank below every number (treated as -inf).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import OpRegistry, interpreter_only_reasons, no_reasons, triton_reasons

NORM_EPS = 1e-12  # as F.normalize: x / max(||x||, eps)
_REF_TILE_ELEMENTS = 1 << 24  # reference: fp64 temporaries of at most [Q, tile] = 16M elements (128 MiB)


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str] = ("a", "b")) -> None:
    for t, name in zip((a, b), names):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} must share the embedding dim, got {a.shape[1]} and {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"{names[0]} is on {a.device} but {names[1]} is on {b.device}; move them to one device")


def similarity_ref(a: Tensor, b: Tensor, scale: float = 1.0, normalize_a: bool = True, normalize_b: bool = True
                   ) -> Tensor:
    """Pure-torch reference: ``scale * normalize(a) @ normalize(b).T`` as fp32. [Q, D], [G, D] -> [Q, G] fp32.

    Computed in float64 and rounded once: every score is then the correctly rounded fp32 value (barring a
    one-in-1e8 rounding-boundary case), independent of matmul blocking, so duplicate gallery items score exactly
    alike in any tile and the top-k tie rule is reproducible. The gallery is processed in tiles of at most
    16M scores, so the only large allocation is the [Q, G] output.
    """
    tile = max(1, min(4096, _REF_TILE_ELEMENTS // max(a.shape[0], 1)))
    a64 = a.double()
    if normalize_a:
        a64 = F.normalize(a64, dim=1, eps=NORM_EPS)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for start in range(0, b.shape[0], tile):
        b64 = b[start:start + tile].double()
        if normalize_b:
            b64 = F.normalize(b64, dim=1, eps=NORM_EPS)
        out[:, start:start + b64.shape[0]] = (a64 @ b64.T).mul_(scale)
    return out


def _similarity_triton(a: Tensor, b: Tensor, scale: float = 1.0, normalize_a: bool = True, normalize_b: bool = True
                       ) -> Tensor:
    from . import similarity_triton

    return similarity_triton.similarity_fwd(a, b, scale, normalize_a, normalize_b)


def _triton_similarity_reasons(a: Tensor, b: Tensor, *args, **kwargs) -> list[str]:
    reasons = triton_reasons((a, b))
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        reasons.append("inputs require grad: the Triton similarity is forward-only (use torch.no_grad() for scoring)")
    if a.dtype != b.dtype:
        reasons.append(f"a and b have different dtypes ({a.dtype}, {b.dtype})")
    return reasons


SIMILARITY = OpRegistry("similarity")
SIMILARITY.register("triton", _similarity_triton, _triton_similarity_reasons,
                    lambda a, b, *_: interpreter_only_reasons((a, b)))
SIMILARITY.register("reference", similarity_ref, no_reasons)


def _similarity(a: Tensor, b: Tensor, scale: float, normalize_a: bool, normalize_b: bool, impl: str) -> Tensor:
    chosen = SIMILARITY.select(impl, a, b)
    return chosen.fn(a, b, float(scale), normalize_a, normalize_b)


def similarity(a: Tensor, b: Tensor, scale: float = 1.0, normalize: bool = True, impl: str = "auto") -> Tensor:
    """Scaled similarity matrix ``scale * normalize(a) @ normalize(b).T``, always float32.

    Args:
        a: queries [Q, D] (fp32, fp16 or bf16).
        b: gallery [G, D], same D (and, for the Triton path, same dtype) as ``a``.
        scale: multiplier applied to the fp32 scores (e.g. an exponentiated ``logit_scale``).
        normalize: L2-normalise the rows of both inputs first (``F.normalize`` semantics, eps 1e-12).
        impl: ``"auto"`` (Triton on CUDA tensors, reference elsewhere), ``"triton"`` or ``"reference"``.

    Returns:
        [Q, G] float32 scores.
    """
    _check_pair(a, b)
    return _similarity(a, b, scale, normalize, normalize, impl)


def _topk_lowest_index(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row of ``x`` [Q, C] with ties broken towards the lower column index. -> ([Q,k], [Q,k]).

    ``torch.topk`` returns the right values but an unspecified choice among tied items, so the selection is redone:
    every item strictly above the k-th value, then the lowest-index items equal to it, then a stable sort.
    """
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    kth = x.topk(k, dim=1, sorted=True).values[:, -1:]
    above = x > kth
    tied = x == kth
    room = k - above.sum(dim=1, keepdim=True)
    keep = above | (tied & (tied.cumsum(dim=1) <= room))
    idx = keep.nonzero()[:, 1].view(x.shape[0], k)  # row-major nonzero: ascending column index within a row
    vals = x.gather(1, idx)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, order)


def similarity_topk(queries: Tensor, gallery: Tensor, k: int, normalize: bool = True, chunk_size: int = 4096,
                    impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Top-``k`` gallery items per query by (normalised) dot product, scanning the gallery in tiles.

    Memory is O(Q * (chunk_size + k)): the [Q, G] score matrix is never built. Ties (exactly equal fp32 scores)
    are broken towards the lower gallery index (see the module docstring). The reference scores are correctly
    rounded, so its result does not depend on ``chunk_size``; the Triton path accumulates in fp32 and may differ
    from it by an ulp, which can swap two items whose scores differ by that much.

    Args:
        queries: [Q, D].
        gallery: [G, D] with G >= k.
        k: number of results per query (1 <= k <= G).
        normalize: L2-normalise queries and gallery rows (cosine similarity).
        chunk_size: gallery rows scored per tile.
        impl: as for :func:`similarity`.

    Returns:
        ``(values [Q, k] float32, indices [Q, k] int64)``, sorted by value descending.
    """
    _check_pair(queries, gallery, ("queries", "gallery"))
    n_gallery = gallery.shape[0]
    if not 1 <= k <= n_gallery:
        raise ValueError(f"k must be in [1, {n_gallery}] (the gallery size), got k={k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    best_v: Tensor | None = None
    best_i: Tensor | None = None
    for start in range(0, n_gallery, chunk_size):
        tile = gallery[start:start + chunk_size]
        scores = _similarity(queries, tile, 1.0, normalize, normalize, impl)
        v, i = _topk_lowest_index(scores, min(k, tile.shape[0]))
        i = i + start
        if best_v is None:
            best_v, best_i = v, i
            continue
        # earlier tiles hold lower indices, and each part is (value desc, index asc): a stable sort keeps that order
        cand_v = torch.cat([best_v, v], dim=1)
        cand_i = torch.cat([best_i, i], dim=1)
        cand_v, order = cand_v.sort(dim=1, descending=True, stable=True)
        best_v, best_i = cand_v[:, :k], cand_i.gather(1, order[:, :k])
    return best_v, best_i
