"""Label-free scores that rank candidate prompts (a registry; the definition of each is part of its record).

The paper's criterion: prompts whose next-token distribution at the summary position has high entropy and whose
embeddings have high rank retrieve better. Entropy (nats) and component counts live on different scales, so
every score works on ranks: each criterion is turned into its normalised fractional rank among the candidates
(0 = lowest, 1 = highest, ties share the mean rank) and the score is the mean of those.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .metrics import fractional_ranks

__all__ = ["SCORES", "LabelFreeScore", "get_score", "register_score"]


@dataclass(frozen=True)
class LabelFreeScore:
    """A score over candidates computed from label-free columns only.

    Attributes:
        name: registry key.
        criteria: result columns; higher is better for each.
        definition: one sentence printed with every report.
    """

    name: str
    criteria: tuple[str, ...]
    definition: str

    def __call__(self, columns: Mapping[str, Sequence[float]]) -> list[float]:
        missing = [c for c in self.criteria if c not in columns]
        if missing:
            raise KeyError(f"score {self.name!r} needs columns {missing}")
        n = len(columns[self.criteria[0]])
        if n == 1:
            return [1.0]
        parts = [(fractional_ranks(columns[c]) - 1.0) / (n - 1) for c in self.criteria]
        return [float(v) for v in sum(parts) / len(parts)]


SCORES: dict[str, LabelFreeScore] = {}


def register_score(score: LabelFreeScore) -> LabelFreeScore:
    if score.name in SCORES:
        raise KeyError(f"score {score.name!r} is already registered")
    SCORES[score.name] = score
    return score


register_score(LabelFreeScore(
    "entropy+rank", ("image_entropy", "text_entropy", "image_k90", "text_k90"),
    "mean of the normalised ranks (0 = lowest, 1 = highest among the candidates) of four label-free quantities: "
    "the mean next-token entropy at the summary position for images and for captions, and the number of principal "
    "components explaining 90% of the variance of the image and of the caption embeddings"))
register_score(LabelFreeScore(
    "entropy", ("image_entropy", "text_entropy"),
    "mean of the normalised ranks of the mean next-token entropy at the summary position, images and captions"))
register_score(LabelFreeScore(
    "rank", ("image_k90", "text_k90"),
    "mean of the normalised ranks of the number of principal components explaining 90% of the variance of the "
    "image and of the caption embeddings"))


def get_score(name: str) -> LabelFreeScore:
    try:
        return SCORES[name]
    except KeyError:
        raise ValueError(f"unknown label-free score {name!r}; known: {', '.join(SCORES)}") from None
