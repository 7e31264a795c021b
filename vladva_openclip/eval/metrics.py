"""Metrics, all with pessimistic tie handling: a tie never counts in the model's favour.

- Pairwise comparisons (SugarCrepe, SugarCrepe++, Winoground) use strict ``>``, as the reference implementations do.
  A model whose embeddings are all equal scores 0 (CLIP_benchmark's argmax would give it 100% on SugarCrepe).
- Ranks (retrieval, classification): the rank of the best positive is the number of *negatives* scoring greater
  than **or equal to** it, so tied negatives are placed ahead of it. Without ties this is exactly CLIP_benchmark's
  recall (a query is a hit when any of its positives is in the top k); with ties CLIP_benchmark depends on
  ``torch.topk``'s order, so a constant model gets credit by index order there, and none here.
- NaN similarities are treated as -inf, so a model that emits NaN scores 0 rather than 100.
All percentages are in [0, 100].
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..progress import progress as tqdm

__all__ = [
    "classification_metrics",
    "group_ranks",
    "itt_hits",
    "pair_scores",
    "percent",
    "recall_at_k",
    "retrieval_metrics",
    "sugarcrepe_accuracy",
    "sugarcrepe_correct",
    "sugarcrepe_pp_correct",
    "winoground_correct",
    "winoground_hits",
]

#: similarity tiles hold at most this many fp32 scores (128 MiB), whatever the gallery size
TILE_ELEMENTS = 1 << 25


def pair_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products in fp32: a [N, D], b [N, D] -> [N]. Exact and order-independent per row, so equal
    inputs give bitwise-equal scores (ties stay ties)."""
    if a.shape != b.shape:
        raise ValueError(f"pair_scores: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.float() * b.float()).sum(-1).nan_to_num(nan=float("-inf"))


def _default_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from vladva_openclip.kernels import similarity  # the project's fused op (Triton on GPU, torch on CPU)

    return similarity(a, b, normalize=False)


def group_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_group: torch.Tensor,
    gallery_group: torch.Tensor,
    *,
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    tile_elements: int = TILE_ELEMENTS,
    progress: bool = False,
    desc: str = "ranking",
) -> torch.Tensor:
    """Pessimistic rank of each query's best positive.

    queries [Q, D], gallery [G, D] (normalised embeddings); gallery item g is a positive of query q iff
    ``query_group[q] == gallery_group[g]`` (LongTensors [Q] and [G]). Returns LongTensor [Q]: the number of
    negatives whose score is >= the best positive's score (0 = retrieved first). A query with no positive gets
    rank = number of negatives. Scores come in tiles of rows from ``similarity(a [t, D], b [G, D]) -> [t, G]``
    (default: ``vladva_openclip.kernels.similarity``), so memory stays bounded for any gallery size.
    """
    sim_fn = similarity or _default_similarity
    n_q, n_g = queries.shape[0], gallery.shape[0]
    rows = max(1, min(n_q, tile_elements // max(n_g, 1)))
    gallery_group = gallery_group.to(gallery.device)
    ranks = []
    starts = range(0, n_q, rows)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        q = queries[start:start + rows]
        sim = sim_fn(q, gallery).float().nan_to_num(nan=float("-inf"))
        positive = query_group[start:start + rows].to(sim.device)[:, None] == gallery_group[None, :]
        best = sim.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(((sim >= best) & ~positive).sum(dim=1).cpu())
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Percentage of queries whose best positive has rank < k."""
    return 100.0 * (ranks < k).double().mean().item()


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    **rank_kwargs,
) -> dict[str, float]:
    """Both directions of a multi-caption retrieval benchmark.

    image_emb [N, D], text_emb [M, D], caption_image LongTensor [M] (image of each caption).
    Text->image (T2I, "image retrieval"): one query per caption, its image is the positive.
    Image->text (I2T, "text retrieval"): one query per image, every caption of it is a positive.
    Keys: ``t2i_R@k``, ``i2t_R@k``, plus mean ranks (1-based, pessimistic) and ``rsum``.
    """
    images = torch.arange(image_emb.shape[0])
    t2i = group_ranks(text_emb, image_emb, caption_image, images, desc="text->image", **rank_kwargs)
    i2t = group_ranks(image_emb, text_emb, images, caption_image, desc="image->text", **rank_kwargs)
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_R@{k}"] = recall_at_k(t2i, k)
    for k in ks:
        out[f"i2t_R@{k}"] = recall_at_k(i2t, k)
    out["t2i_mean_rank"] = (t2i.double() + 1).mean().item()
    out["i2t_mean_rank"] = (i2t.double() + 1).mean().item()
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in ks)
    return out


def sugarcrepe_correct(image: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """SugarCrepe: image, positive, negative [N, D] -> BoolTensor [N], ``s(I, P) > s(I, N)``."""
    return pair_scores(image, positive) > pair_scores(image, negative)


def sugarcrepe_pp_correct(image: torch.Tensor | None, p1: torch.Tensor, p2: torch.Tensor,
                          negative: torch.Tensor) -> dict[str, torch.Tensor]:
    """SugarCrepe++ (all [N, D]) -> BoolTensors [N]:

    ``itt``: s(I,P1) > s(I,N) and s(I,P2) > s(I,N)   (image-to-text task; needs the image)
    ``tot``: s(P1,P2) > s(P1,N) and s(P1,P2) > s(P2,N)   (text-only task)
    ``img_p1_neg`` / ``img_p2_neg``: each half of ITT on its own.
    """
    p12 = pair_scores(p1, p2)
    out = {"tot": (p12 > pair_scores(p1, negative)) & (p12 > pair_scores(p2, negative))}
    if image is not None:
        out.update(itt_hits(pair_scores(image, p1), pair_scores(image, p2), pair_scores(image, negative)))
    return out


def itt_hits(s1: torch.Tensor, s2: torch.Tensor, sn: torch.Tensor) -> dict[str, torch.Tensor]:
    """SugarCrepe++ ITT from the image's scores [N] of P1, P2 and N (any scoring) -> BoolTensors [N]
    ``img_p1_neg`` (s1 > sn), ``img_p2_neg`` (s2 > sn) and ``itt`` (both)."""
    out = {"img_p1_neg": s1 > sn, "img_p2_neg": s2 > sn}
    out["itt"] = out["img_p1_neg"] & out["img_p2_neg"]
    return out


def winoground_correct(i0: torch.Tensor, i1: torch.Tensor, c0: torch.Tensor,
                       c1: torch.Tensor) -> dict[str, torch.Tensor]:
    """Winoground (all [N, D]) -> BoolTensors [N] ``text``, ``image``, ``group`` with s(c, i) a dot product:

    text:  s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1)
    image: s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0)
    group: text and image
    """
    return winoground_hits(pair_scores(c0, i0), pair_scores(c0, i1), pair_scores(c1, i0), pair_scores(c1, i1))


def winoground_hits(s00: torch.Tensor, s01: torch.Tensor, s10: torch.Tensor,
                    s11: torch.Tensor) -> dict[str, torch.Tensor]:
    """Winoground's rules on scores [N] ``s_ci`` = s(caption c, image i), whatever produced them (embeddings or
    the LVLM's likelihood) -> BoolTensors [N] ``text``, ``image``, ``group``."""
    text = (s00 > s10) & (s11 > s01)
    image = (s00 > s01) & (s11 > s10)
    return {"text": text, "image": image, "group": text & image}


def percent(hits: torch.Tensor) -> float:
    """BoolTensor -> accuracy in % (double precision, so the same hits give the same digits on every path)."""
    return 100.0 * hits.double().mean().item()


def sugarcrepe_accuracy(correct: Mapping[str, torch.Tensor], order: Sequence[str] = ()) -> dict[str, float]:
    """SugarCrepe: per-subset hits [N_subset] -> accuracy in % per subset (the names in ``order`` first) and the
    ``replace`` / ``swap`` / ``add`` micro-averages over the examples of their subsets, as in the paper."""
    out = {n: percent(correct[n]) for n in (*order, *correct) if n in correct}
    for group in ("replace", "swap", "add"):
        parts = [hits for n, hits in correct.items() if n.startswith(group + "_")]
        if parts:
            out[group] = percent(torch.cat(parts))
    return out


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor,
                           ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """logits [N, C], targets LongTensor [N] -> ``top{k}`` (pessimistic ties; only for k <= C) and
    ``mean_per_class_recall`` (top-1 recall averaged over the classes that have images)."""
    logits = logits.float().nan_to_num(nan=float("-inf"))
    c = logits.shape[1]
    target_score = logits.gather(1, targets[:, None])
    rank = (logits >= target_score).sum(1) - 1  # minus the target itself
    out = {f"top{k}": recall_at_k(rank, k) for k in ks if k <= c}
    hit1 = (rank < 1).double()
    per_class = torch.zeros(c, dtype=torch.float64).index_add_(0, targets, hit1)
    counts = torch.bincount(targets, minlength=c).double()
    present = counts > 0
    out["mean_per_class_recall"] = 100.0 * (per_class[present] / counts[present]).mean().item()
    return out

