"""Generative scoring: how likely the LVLM itself finds a caption, given the image.

A VladVA model is still a generative LVLM. Instead of comparing embeddings, a caption ``c`` can be scored for an
image ``i`` by the model's own next-token log-likelihood of ``c`` after ``[template | image tokens | image prompt]``
(the sequence its AR loss trains on), ending with the EOS target::

    s(i, c) = (1 / |c|) * sum_t log p(c_t | i, prompt, c_<t)      (reduction "mean", the default)
    s(i, c) =             sum_t log p(c_t | i, prompt, c_<t)      (reduction "sum")

``|c|`` counts the caption's tokens plus EOS. The pair tasks then apply their usual rules to these scores (strict
``>``, ties are wrong): SugarCrepe (``s(I, P) > s(I, N)``), SugarCrepe++ ITT (TOT compares two texts without an
image: not defined here), Winoground (text, image, group). Retrieval and classification would need a forward pass
per (image, caption) pair of the whole gallery and are not offered. Metric names are the embedding path's, so
reports and tables read the same.

It tells apart two reasons for an embedding model to fail on word order: the LVLM's likelihood gets the pair right
but its summary-token embedding does not (the embedding path loses the information), or neither does (the base
never had it).

    from vladva_openclip.eval.generative import evaluate_generative
    results = evaluate_generative(model, preprocess, tokenizer, [{"task": "sugarcrepe", "data": "sugar_crepe/",
                                                                  "images": "val2017/"}])

or ``vladva-eval --scoring generative ...``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..progress import progress as tqdm
from . import metrics as M
from .data_compositional import SUGARCREPE_SUBSETS, CaptionSetData, WinogroundData
from .images import ImageSet
from .tasks import prepare_tasks

__all__ = ["GENERATIVE_TASKS", "REDUCTIONS", "GenerativeConfig", "GenerativeScorer", "evaluate_generative"]

_logger = logging.getLogger(__name__)

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class GenerativeConfig:
    """batch_size: (image, caption) pairs per forward; reduction: ``mean`` (per token) or ``sum`` log-likelihood;
    max_caption_len: caption tokens scored (a longer caption is cut and scored without its EOS target)."""

    batch_size: int = 64
    reduction: str = "mean"
    max_caption_len: int = 128
    progress: bool = True

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.batch_size < 1 or self.max_caption_len < 1:
            raise ValueError(f"batch_size and max_caption_len must be >= 1, got {self.batch_size}, "
                             f"{self.max_caption_len}")


class GenerativeScorer:
    """Log-likelihood scores of (image, caption) pairs under a VladVA model (see the module docstring).

    Args:
        model: a VladVA model (its ``image_features_and_ar`` runs the caption after the image and image prompt).
        preprocess: the model's image transform (PIL -> ``[3, S, S]``).
        tokenizer: the model's tokenizer (its ``long_captions`` tokenizes a caption as the answer after the prompt).
    """

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 config: GenerativeConfig | None = None, device: str | torch.device | None = None):
        if not hasattr(model, "image_features_and_ar") or not hasattr(tokenizer, "long_captions"):
            raise TypeError(f"generative scoring needs a VladVA model and its tokenizer (the LVLM scores captions); "
                            f"got {type(model).__name__} with {type(tokenizer).__name__}")
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.config = config or GenerativeConfig()
        if device is not None:
            model.to(device)
        model.eval()

    @torch.no_grad()
    def caption_log_likelihood(self, images: torch.Tensor, captions: Sequence[str]) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
        """Per pair: (summed log-likelihood ``[B]`` float32, scored token count ``[B]``) of ``captions[b]`` given
        the preprocessed ``images[b]`` (``[B, 3, S, S]``)."""
        ids = self.tokenizer.long_captions(list(captions), context_length=self.config.max_caption_len)
        _, nll_sum, counts = self.model.image_features_and_ar(images, ids)
        return -nll_sum.float().cpu(), counts.float().cpu()

    def score(self, images: ImageSet, image_index: torch.Tensor, captions: Sequence[str],
              desc: str = "pairs") -> torch.Tensor:
        """Scores of the pairs ``(images[image_index[k]], captions[k])``: ``[n]`` float32, in input order.

        Repeated pairs are scored once; pairs are grouped by image so each image is loaded and preprocessed once
        per batch.
        """
        if len(image_index) != len(captions):
            raise ValueError(f"{len(image_index)} image indices for {len(captions)} captions")
        keys = list(zip(image_index.tolist(), captions))
        unique = sorted(set(keys), key=lambda k: (k[0], k[1]))
        scores: dict[tuple[int, str], float] = {}
        bs = self.config.batch_size
        loaded: dict[int, torch.Tensor] = {}
        for start in tqdm(range(0, len(unique), bs), desc=f"generative {desc}", disable=not self.config.progress,
                          leave=False):
            batch = unique[start:start + bs]
            loaded = {i: loaded[i] if i in loaded else self.preprocess(images.load(i)) for i, _ in batch}
            x = torch.stack([loaded[i] for i, _ in batch])
            total, counts = self.caption_log_likelihood(x, [c for _, c in batch])
            values = total / counts.clamp(min=1) if self.config.reduction == "mean" else total
            scores.update(zip(batch, values.tolist()))
        return torch.tensor([scores[k] for k in keys], dtype=torch.float32)


def _sugarcrepe(scorer: GenerativeScorer, data: CaptionSetData, name: str) -> dict[str, float]:
    correct = {}
    for n, sub in data.subsets.items():
        pos = scorer.score(data.images, sub["image"], sub["caption"], desc=f"{name} {n} positives")
        neg = scorer.score(data.images, sub["image"], sub["negative_caption"], desc=f"{name} {n} negatives")
        correct[n] = pos > neg
    return M.sugarcrepe_accuracy(correct, order=SUGARCREPE_SUBSETS)


def _sugarcrepe_pp(scorer: GenerativeScorer, data: CaptionSetData, name: str) -> dict[str, float]:
    if data.images is None:
        raise ValueError(f"{name}: generative scoring needs the images (SugarCrepe++ TOT, the text-only task, "
                         "compares two captions without an image and is not defined for it)")
    out: dict[str, float] = {}
    itt = []
    for n, sub in data.subsets.items():
        s1, s2, sn = (scorer.score(data.images, sub["image"], sub[role], desc=f"{name} {n} {role}")
                      for role in ("caption", "caption2", "negative_caption"))
        out.update({f"{n}_{k}": M.percent(v) for k, v in M.itt_hits(s1, s2, sn).items()})
        itt.append(out[f"{n}_itt"])
    if itt:
        out["avg_itt"] = sum(itt) / len(itt)
    return out


def _winoground(scorer: GenerativeScorer, data: WinogroundData, name: str) -> dict[str, float]:
    n = len(data.caption_0)
    i0, i1 = torch.arange(n) * 2, torch.arange(n) * 2 + 1
    s = {(c, i): scorer.score(data.images, idx, caps, desc=f"{name} c{c} i{i}")
         for c, caps in ((0, data.caption_0), (1, data.caption_1)) for i, idx in ((0, i0), (1, i1))}
    hits = M.winoground_hits(s[0, 0], s[0, 1], s[1, 0], s[1, 1])
    return {k: M.percent(v) for k, v in hits.items()}


#: task type -> scorer of its prepared data (the embedding path's metric names)
GENERATIVE_TASKS: dict[str, Callable[[GenerativeScorer, Any, str], dict[str, float]]] = {
    "sugarcrepe": _sugarcrepe,
    "sugarcrepe_pp": _sugarcrepe_pp,
    "winoground": _winoground,
}


def check_generative_tasks(tasks: Sequence[Any]) -> None:
    """Raise ValueError naming the tasks generative scoring does not offer (built Task objects)."""
    bad = sorted({t.task_type for t in tasks if t.task_type not in GENERATIVE_TASKS})
    if bad:
        raise ValueError(f"generative scoring supports the pair tasks {', '.join(GENERATIVE_TASKS)}; not "
                         f"{', '.join(bad)} (retrieval and classification would need a forward pass per gallery "
                         "pair): use --scoring embedding for those")


def run_generative(scorer: GenerativeScorer, prepared: Sequence[Any],
                   on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Score every prepared task; results have the shape of :func:`~.api.evaluate`'s, with ``"scoring"``."""
    check_generative_tasks(prepared)
    results = {}
    for task in prepared:
        start = time.perf_counter()
        data = task.prepare()
        metrics = GENERATIVE_TASKS[task.task_type](scorer, data, task.name)
        result = {"task": task.task_type, "name": task.name, "metrics": metrics,
                  "info": {**dict(data.info), "scoring": "generative", "reduction": scorer.config.reduction},
                  "seconds": round(time.perf_counter() - start, 3)}
        results[task.name] = result
        _logger.info("%s (generative): %s", task.name, metrics)
        if on_result is not None:
            on_result(result)
    return results


def evaluate_generative(model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                        tasks: Sequence[Any | Mapping[str, Any]], *, device: str | torch.device | None = None,
                        batch_size: int = 64, reduction: str = "mean", max_caption_len: int = 128,
                        progress: bool = True) -> dict[str, dict[str, Any]]:
    """Generative scoring of a built VladVA model on pair tasks (``{"task": type, ...}`` dicts or Task objects):
    ``{task name: {"task", "name", "metrics", "info", "seconds"}}``."""
    scorer = GenerativeScorer(model, preprocess, tokenizer, GenerativeConfig(
        batch_size=batch_size, reduction=reduction, max_caption_len=max_caption_len, progress=progress),
        device=device)
    return run_generative(scorer, prepare_tasks(tasks))
