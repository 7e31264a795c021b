"""Prompt selection without labels (the paper's Figs. 2, 3 and 5).

For every candidate (image prompt, text prompt) pair the model is run on an image set and a caption set, and
the report gives:

- the mean entropy (nats) of the next-token distribution at the summary position, images and captions (Fig. 2);
- the cumulative explained variance of the L2-normalised embedding matrix and the number of principal
  components needed for 90% and 99% of it, the effective rank (Fig. 3);
- zero-shot retrieval R@1 both ways when the captions are paired with the images (Fig. 5), and the Spearman
  correlation of each label-free quantity with R@1;
- a label-free score (see :mod:`.selection`) that ranks the candidates, and the recommended pair.

Every candidate is a *handcrafted* prompt on the analysed weights (a prompt view): soft prompts are trained from
a handcrafted start, which is what this chooses. Images go through the vision tower once for all prompts, and the
LLM's shared ``[template | image tokens]`` prefix once per batch (see :mod:`._lvlm`). Results per prompt are cached
on disk when ``cache_dir`` is set.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..progress import progress as tqdm
from . import _lvlm
from .data import AnalysisData, image_batches
from .metrics import components_for, cumulative_explained_variance, entropy_from_logits, permutation_pvalue, spearman
from .outputs import markdown_table, write_csv, write_json, write_text
from .prompt_sets import PromptPair, validate_pairs
from .selection import get_score

__all__ = ["PromptRow", "PromptSearchConfig", "PromptSearchResult", "apply_prompt_pair", "search_prompts"]

_logger = logging.getLogger(__name__)

#: label-free columns correlated with retrieval, and the retrieval targets
CORRELATED = ("image_entropy", "text_entropy", "image_k90", "image_k99", "text_k90", "text_k99", "score")
TARGETS = ("t2i_R@1", "i2t_R@1", "mean_R@1")
_CACHE_VERSION = "prompt-search-v1"


@dataclass
class PromptSearchConfig:
    """batch_size: images (and captions) per forward; cache_dir: per-prompt results on disk (None: no cache);
    score: a name from ``selection.SCORES``; reuse: share the vision pass and the LLM prefix across prompts;
    permutations: for the correlations' p-values."""

    batch_size: int = 32
    cache_dir: str | None = None
    score: str = "entropy+rank"
    reuse: bool = True
    permutations: int = 10000
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        get_score(self.score)


@dataclass
class PromptRow:
    """One candidate's measurements. ``*_cev`` are cumulative explained-variance curves ``[min(N, D)]``."""

    index: int
    image_prompt: str
    text_prompt: str
    image_entropy: float
    text_entropy: float
    image_k90: int
    image_k99: int
    text_k90: int
    text_k99: int
    image_cev: list[float] = field(repr=False)
    text_cev: list[float] = field(repr=False)
    t2i_r1: float = float("nan")
    i2t_r1: float = float("nan")
    score: float = float("nan")
    rank: int = 0

    def flat(self) -> dict[str, Any]:
        """The CSV row (curves left out)."""
        d = {k: v for k, v in asdict(self).items() if not k.endswith("_cev")}
        d["t2i_R@1"], d["i2t_R@1"] = d.pop("t2i_r1"), d.pop("i2t_r1")
        d["mean_R@1"] = (self.t2i_r1 + self.i2t_r1) / 2
        return d


@dataclass
class PromptSearchResult:
    rows: list[PromptRow]
    score_name: str
    score_definition: str
    correlations: dict[str, dict[str, dict[str, float]]]
    info: dict[str, Any]

    @property
    def ranked(self) -> list[PromptRow]:
        return sorted(self.rows, key=lambda r: r.rank)

    @property
    def recommended(self) -> PromptPair:
        best = self.ranked[0]
        return PromptPair(best.image_prompt, best.text_prompt)

    def to_json(self) -> dict[str, Any]:
        return {"recommended": asdict(self.recommended), "score": {"name": self.score_name,
                                                                  "definition": self.score_definition},
                "correlations": self.correlations, "info": self.info,
                "candidates": [asdict(r) for r in self.rows]}

    def to_markdown(self, top: int | None = None) -> str:
        cols = ["rank", "index", "image_prompt", "text_prompt", "image_entropy", "text_entropy", "image_k90",
                "image_k99", "text_k90", "text_k99", "t2i_R@1", "i2t_R@1", "score"]
        rows = [r.flat() for r in self.ranked[:top]]
        return markdown_table(rows, cols)

    def save(self, out: str | os.PathLike, plots: bool = True) -> dict[str, str]:
        """``prompts.csv`` (one row per candidate), ``prompts.json`` (everything, curves included), ``prompts.md``,
        and the three figures."""
        out = Path(out)
        files = {"csv": write_csv(out / "prompts.csv", [r.flat() for r in self.rows]),
                 "json": write_json(out / "prompts.json", self.to_json()),
                 "md": write_text(out / "prompts.md", self.to_markdown() + "\n")}
        if plots:
            from .plots import plot_cumulative_variance, plot_prompt_entropy, plot_retrieval_by_entropy

            files["entropy_png"] = plot_prompt_entropy(self, out / "prompts_entropy.png")
            files["variance_png"] = plot_cumulative_variance(self, out / "prompts_cumulative_variance.png")
            if self.info.get("paired"):
                files["retrieval_png"] = plot_retrieval_by_entropy(self, out / "prompts_retrieval_by_entropy.png")
        return {k: str(v) for k, v in files.items()}


# ---- caching -----------------------------------------------------------------------------------------------
class _PromptCache:
    """Per-prompt embeddings and entropies, keyed by model weights, template, prompt and data."""

    def __init__(self, root: str | None, model, model_id: str | None):
        from ..eval.cache import EmbeddingCache, weights_fingerprint

        self.cache = EmbeddingCache(os.path.expanduser(root)) if root else None
        if self.cache is not None:
            ident = {"v": _CACHE_VERSION, "model_id": model_id or model.model_name,
                     "weights": weights_fingerprint(model), "template": asdict(model.cfg.template),
                     "image_size": model.cfg.image_size, "dtype": str(model.base_dtype)}
            self.model_key = hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=16).hexdigest()

    def get(self, kind: str, data_key: str, prompt: str, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cache is None:
            return None
        key = f"{data_key}|{prompt}"
        emb = self.cache.get(self.model_key, f"{kind}-emb", key, n)
        ent = self.cache.get(self.model_key, f"{kind}-entropy", key, n)
        return None if emb is None or ent is None else (emb, ent[:, 0])

    def put(self, kind: str, data_key: str, prompt: str, emb: torch.Tensor, ent: torch.Tensor) -> None:
        if self.cache is None:
            return
        key = f"{data_key}|{prompt}"
        meta = {"prompt": prompt, "kind": kind}
        self.cache.put(self.model_key, f"{kind}-emb", key, emb, meta)
        self.cache.put(self.model_key, f"{kind}-entropy", key, ent[:, None], meta)


# ---- the two towers ----------------------------------------------------------------------------------------
@torch.no_grad()
def _image_side(model, preprocess, data: AnalysisData, prompts: list[str], cfg: PromptSearchConfig,
                cache: _PromptCache) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """prompt -> (normalised embeddings ``[N, D]``, entropies ``[N]``), both on CPU."""
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    todo = []
    for p in prompts:
        hit = cache.get("image", data.images.fingerprint, p, len(data.images))
        if hit is not None:
            results[p] = hit
        else:
            todo.append(p)
    if not todo:
        return results
    views = [_lvlm.prompt_view(model, image_prompt=p) for p in todo]
    embs: list[list[torch.Tensor]] = [[] for _ in todo]
    ents: list[list[torch.Tensor]] = [[] for _ in todo]
    n_batches = -(-len(data.images) // cfg.batch_size)
    bar = tqdm(total=n_batches * len(todo), desc=f"image prompts ({n_batches} batches each)", unit="prompt-batch",
               disable=not cfg.progress)
    for _, pixels in image_batches(data.images, preprocess, cfg.batch_size):
        feats = _lvlm.encode_images_with_prompts(model, views, pixels, reuse=cfg.reuse)
        for k, f in enumerate(feats):
            ents[k].append(entropy_from_logits(_lvlm.summary_logits(model, f)).cpu())
            embs[k].append(F.normalize(f, dim=-1).cpu())
        bar.update(len(todo))
    bar.close()
    for k, p in enumerate(todo):
        results[p] = (torch.cat(embs[k]), torch.cat(ents[k]))
        cache.put("image", data.images.fingerprint, p, *results[p])
    return results


@torch.no_grad()
def _text_side(model, tokenizer: Callable, captions: list[str], prompt: str, cfg: PromptSearchConfig,
               cache: _PromptCache) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised embeddings ``[M, D]``, entropies ``[M]``) of the captions under one text prompt."""
    from ..eval.cache import texts_fingerprint
    from ..eval.embed import length_buckets

    data_key = texts_fingerprint(captions)
    hit = cache.get("text", data_key, prompt, len(captions))
    if hit is not None:
        return hit
    view = _lvlm.prompt_view(model, text_prompt=prompt)
    emb = ent = None
    for idx in length_buckets(captions, cfg.batch_size):  # similar lengths per batch: little padding
        tokens = tokenizer([captions[i] for i in idx]).to(model.device)
        f = view.encode_text(tokens)
        if emb is None:
            emb, ent = torch.empty(len(captions), f.shape[-1]), torch.empty(len(captions))
        where = torch.tensor(idx)
        emb[where] = F.normalize(f, dim=-1).cpu()
        ent[where] = entropy_from_logits(_lvlm.summary_logits(model, f)).cpu()
    cache.put("text", data_key, prompt, emb, ent)
    return emb, ent


def _rank_stats(emb: torch.Tensor) -> tuple[list[float], int, int]:
    cev = cumulative_explained_variance(emb)
    return cev.tolist(), components_for(cev, 0.9), components_for(cev, 0.99)


# ---- the search --------------------------------------------------------------------------------------------
def search_prompts(
    model,
    preprocess: Callable,
    data: AnalysisData,
    pairs: Sequence[PromptPair],
    config: PromptSearchConfig | None = None,
    *,
    tokenizer: Callable | None = None,
    model_id: str | None = None,
) -> PromptSearchResult:
    """Measure every candidate pair and rank them by the label-free score.

    Args:
        model: a VladVA model (eval mode is set here); preprocess: its image transform;
        data: images and captions (paired for R@1); pairs: the candidates (at least one).
        tokenizer: the caption tokenizer (default: the model's own).
        model_id: names the weights in the cache key (the weights are hashed as well).
    """
    _lvlm.require_vladva(model, "the prompt search")
    cfg = config or PromptSearchConfig()
    pairs = validate_pairs(list(pairs))
    if len(data.images) < 2 or len(data.captions) < 2:
        raise ValueError(f"the prompt search needs at least 2 images and 2 captions (effective rank, retrieval); "
                         f"got {len(data.images)} images and {len(data.captions)} captions")
    tokenizer = tokenizer or model.tokenizer
    model.eval()
    cache = _PromptCache(cfg.cache_dir, model, model_id)
    image_prompts = list(dict.fromkeys(p.image for p in pairs))
    text_prompts = list(dict.fromkeys(p.text for p in pairs))
    image_res = _image_side(model, preprocess, data, image_prompts, cfg, cache)
    image_stats = {p: (float(e.mean()), *_rank_stats(x)) for p, (x, e) in image_res.items()}

    text_stats: dict[str, tuple[float, list[float], int, int]] = {}
    retrieval: dict[tuple[str, str], dict[str, float]] = {}
    for tp in tqdm(text_prompts, desc="text prompts", disable=not cfg.progress):
        temb, tent = _text_side(model, tokenizer, data.captions, tp, cfg, cache)
        text_stats[tp] = (float(tent.mean()), *_rank_stats(temb))
        if data.paired:
            from ..eval.metrics import retrieval_metrics

            for pair in pairs:
                if pair.text == tp:
                    retrieval[(pair.image, tp)] = retrieval_metrics(image_res[pair.image][0], temb,
                                                                    data.caption_image, ks=(1,))
        del temb

    rows = []
    for i, pair in enumerate(pairs):
        ih, icev, ik90, ik99 = image_stats[pair.image]
        th, tcev, tk90, tk99 = text_stats[pair.text]
        r = retrieval.get((pair.image, pair.text), {})
        rows.append(PromptRow(i, pair.image, pair.text, ih, th, ik90, ik99, tk90, tk99, icev, tcev,
                              r.get("t2i_R@1", float("nan")), r.get("i2t_R@1", float("nan"))))
    score = get_score(cfg.score)
    columns = {k: [getattr(r, k) for r in rows] for k in score.criteria}
    for r, s in zip(rows, score(columns)):
        r.score = s
    # Highest score first; ties go to the earlier candidate.
    for rank, r in enumerate(sorted(rows, key=lambda r: (-r.score, r.index)), start=1):
        r.rank = rank
    correlations = _correlations(rows, cfg.permutations) if data.paired and len(rows) >= 3 else {}
    info = {"n_candidates": len(rows), "n_images": len(data.images), "n_captions": len(data.captions),
            "paired": data.paired, "data": data.info, "model": model_id or model.model_name,
            "template": asdict(model.cfg.template), "embedding_dim": model.embed_dim,
            "pca": "L2-normalised embeddings, centred; variance ratios from the singular values"}
    result = PromptSearchResult(rows, score.name, score.definition, correlations, info)
    best = result.ranked[0]
    _logger.info("recommended prompts (score %.3f): image %r, text %r", best.score, best.image_prompt,
                 best.text_prompt)
    return result


def _correlations(rows: list[PromptRow], permutations: int) -> dict[str, dict[str, dict[str, float]]]:
    """Spearman's rho (and a permutation p-value) of every label-free column with every R@1 column."""
    flat = [r.flat() for r in rows]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for x in CORRELATED:
        out[x] = {}
        for y in TARGETS:
            xs, ys = [f[x] for f in flat], [f[y] for f in flat]
            out[x][y] = {"rho": spearman(xs, ys), "p": permutation_pvalue(xs, ys, permutations), "n": len(xs)}
    return out


# ---- applying the choice -----------------------------------------------------------------------------------
def apply_prompt_pair(model, pair: PromptPair, out: str | os.PathLike, include_base: bool | None = None) -> Path:
    """Write an adapter directory whose model uses ``pair``: ``create_model(name, pretrained=out)`` loads it.

    The analysed weights' LoRA and ``logit_scale`` are kept; the prompt modes stay the model's (a soft prompt
    is initialised from the chosen text, which gives the same embeddings until it is trained).

    Args:
        include_base: also store the base weights; default: only when the model has no downloadable base
            (tiny models, whose base is random or a shipped tag).
    """
    from ..adapters import save_adapter

    _lvlm.require_vladva(model, "--apply")
    applied = _lvlm.prompt_view(model, pair.image, pair.text, keep_modes=True)
    if include_base is None:
        include_base = model.cfg.base_model is None
    path = save_adapter(applied, out, include_base=include_base)
    _logger.info("wrote %s: image prompt %r, text prompt %r (base weights %s)", path, pair.image, pair.text,
                 "included" if include_base else f"from {model.cfg.base_model}")
    return path
