"""Evaluation task types, registered by name: ``TASKS["retrieval"]`` etc. (see :func:`register_task`).

A task reads and validates its data once (:meth:`Task.prepare`, before any model runs), then scores any number of
models through an :class:`~vladva_openclip.eval.embed.Embedder` (:meth:`Task.run`). Each task type also says how
its metrics are laid out in the Markdown report (:meth:`Task.columns`), following the paper's tables.
"""
from __future__ import annotations

import dataclasses
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from . import metrics as M
from .data_classification import ClassificationData, load_image_folder, render_template
from .data_compositional import (
    SUGARCREPE_PP_SUBSETS,
    SUGARCREPE_SUBSETS,
    CaptionSetData,
    WinogroundData,
    load_sugarcrepe,
    load_sugarcrepe_pp,
    load_winoground,
)
from .data_retrieval import RetrievalData, load_retrieval
from .embed import Embedder

__all__ = [
    "TASKS",
    "Column",
    "RetrievalTask",
    "SugarCrepePPTask",
    "SugarCrepeTask",
    "Task",
    "WinogroundTask",
    "ZeroShotClassificationTask",
    "build_task",
    "register_task",
    "subset_names",
]

PathLike = str | os.PathLike

#: task type name (and aliases) -> Task subclass
TASKS: dict[str, type[Task]] = {}


def register_task(name: str, *aliases: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator adding a Task subclass to :data:`TASKS` under ``name`` and any aliases."""
    def wrap(cls: type[Task]) -> type[Task]:
        for key in (name, *aliases):
            if key in TASKS and TASKS[key] is not cls:
                raise ValueError(f"task type {key!r} is already registered to {TASKS[key].__name__}")
            TASKS[key] = cls
        cls.task_type = name
        return cls
    return wrap


def build_task(spec: Task | Mapping[str, Any]) -> Task:
    """A Task from a Task (returned as is) or a dict ``{"task": type, **config fields}``."""
    if isinstance(spec, Task):
        return spec
    spec = dict(spec)
    kind = spec.pop("task", None)
    if kind not in TASKS:
        raise ValueError(f"unknown task type {kind!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[kind](**spec)


@dataclass(frozen=True)
class Column:
    """A Markdown column: ``header`` over the cells ``" / ".join(metrics[k] for k in keys)``."""

    header: str
    keys: tuple[str, ...]


class Task(ABC):
    """Base class. Subclasses set ``Config`` (a dataclass with at least ``name``), ``title``, ``protocol``."""

    task_type: ClassVar[str] = ""
    title: ClassVar[str] = ""
    protocol: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any = None, **kwargs: Any):
        if config is not None and kwargs:
            raise TypeError("pass either a config object or keyword fields, not both")
        if config is None:
            known = {f.name for f in dataclasses.fields(self.Config)}
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise TypeError(f"{type(self).__name__}: unknown option(s) {unknown}; options: {sorted(known)}")
            config = self.Config(**kwargs)
        self.config = config
        self._data: Any = None

    @property
    def name(self) -> str:
        """Label of this task instance in results (e.g. "flickr30k")."""
        return self.config.name or self.task_type

    def prepare(self) -> Any:
        """Read and validate the data (once); raises EvalDataError subclasses on bad input."""
        if self._data is None:
            self._data = self.load()
        return self._data

    @abstractmethod
    def load(self) -> Any: ...

    @abstractmethod
    def score(self, embedder: Embedder, data: Any) -> dict[str, float]: ...

    def run(self, embedder: Embedder) -> dict[str, Any]:
        """-> ``{"task", "name", "metrics": {key: percent}, "info": {...}}``"""
        data = self.prepare()
        return {"task": self.task_type, "name": self.name, "metrics": self.score(embedder, data),
                "info": dict(data.info)}

    @classmethod
    def columns(cls, results: Sequence[Mapping[str, Any]]) -> list[Column]:
        """Markdown columns for this task type, given the result dicts of one task instance."""
        keys = sorted({k for r in results for k in r["metrics"]})
        return [Column(k, (k,)) for k in keys]


@dataclass
class RetrievalConfig:
    """data: Karpathy dataset_*.json, per-image JSON list, or COCO-captions JSON (nocaps); images: folder the
    image paths are relative to (default: the JSON's folder); split: Karpathy split (None = all);
    domain: nocaps domain filter; recall_k: the k of R@k."""

    data: PathLike
    images: PathLike | None = None
    split: str | None = "test"
    domain: str | None = None
    name: str | None = None
    skip_missing: bool = False
    recall_k: tuple[int, ...] = (1, 5, 10)


@register_task("retrieval")
class RetrievalTask(Task):
    Config = RetrievalConfig
    title = "Zero-shot retrieval (T2I = text->image, I2T = image->text)"
    protocol = ("Recall@k in %: a query is a hit if any of its positives is among the k best-scored gallery "
                "items; all captions of an image are used (T2I: one query per caption; I2T: one query per image, "
                "each of its captions a positive). Ties are pessimistic: tied negatives rank ahead of the positive.")

    @property
    def name(self) -> str:
        if self.config.name:
            return self.config.name
        stem = os.path.splitext(os.path.basename(str(self.config.data)))[0]
        return re.sub(r"^dataset_", "", stem)

    def load(self) -> RetrievalData:
        c = self.config
        return load_retrieval(c.data, c.images, split=c.split, skip_missing=c.skip_missing, domain=c.domain)

    def score(self, embedder: Embedder, data: RetrievalData) -> dict[str, float]:
        images = embedder.images(data.images, desc=f"{self.name} images")
        texts = embedder.texts(data.captions, desc=f"{self.name} captions")
        dev = embedder.device
        return M.retrieval_metrics(images.to(dev), texts.to(dev), data.caption_image, ks=self.config.recall_k,
                                   progress=embedder.config.progress)

    @classmethod
    def columns(cls, results: Sequence[Mapping[str, Any]]) -> list[Column]:
        ks = sorted({int(k.split("@")[1]) for r in results for k in r["metrics"] if k.startswith("t2i_R@")})
        label = "/".join(f"R@{k}" for k in ks)
        return [Column(f"T2I {label}", tuple(f"t2i_R@{k}" for k in ks)),
                Column(f"I2T {label}", tuple(f"i2t_R@{k}" for k in ks))]


def subset_names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``subsets`` as given in Python or a tasks file -> a tuple of names (None: all).

    A string is one name or a comma-separated list (``"swap_att"``, ``"swap_att,add_obj"``); iterating it would
    give single characters.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(x, str) for x in items):
        raise TypeError(f"subsets must be a string or a list of strings, got {value!r}")
    names = tuple(x.strip() for x in items if x.strip())
    if not names:
        raise ValueError(f"subsets={value!r} names no subset; leave it out to use all of them")
    return names


_SC_SHORT = {"replace_obj": "RO", "replace_att": "RA", "replace_rel": "RR", "swap_obj": "SO", "swap_att": "SA",
             "add_obj": "AO", "add_att": "AA"}


@dataclass
class SugarCrepeConfig:
    """data: folder of <subset>.json files (or one file); images: COCO val2017 folder; subsets: default all
    present of the 7 standard ones."""

    data: PathLike
    images: PathLike | None = None
    subsets: tuple[str, ...] | None = None
    name: str | None = "sugarcrepe"
    skip_missing: bool = False

    def __post_init__(self):
        self.subsets = subset_names(self.subsets)


@register_task("sugarcrepe", "sugar_crepe")
class SugarCrepeTask(Task):
    Config = SugarCrepeConfig
    title = "SugarCrepe accuracy (%)"
    protocol = ("Accuracy in %: s(image, positive) > s(image, negative), strict (a tie is wrong). "
                "replace/swap/add are micro-averages over the examples of their subsets, as in the paper.")

    def load(self) -> CaptionSetData:
        c = self.config
        return load_sugarcrepe(c.data, c.images, subsets=c.subsets, skip_missing=c.skip_missing)

    def score(self, embedder: Embedder, data: CaptionSetData) -> dict[str, float]:
        images = embedder.images(data.images, desc=f"{self.name} images")
        names = list(data.subsets)
        all_texts = [t for n in names for role in ("caption", "negative_caption") for t in data.subsets[n][role]]
        text_emb = iter(torch.split(embedder.texts(all_texts, desc=f"{self.name} captions"),
                                    [len(data.subsets[n]["ids"]) for n in names for _ in range(2)]))
        correct = {}
        for n in names:
            pos, neg = next(text_emb), next(text_emb)
            correct[n] = M.sugarcrepe_correct(images[data.subsets[n]["image"]], pos, neg)
        return M.sugarcrepe_accuracy(correct, order=SUGARCREPE_SUBSETS)

    @classmethod
    def columns(cls, results: Sequence[Mapping[str, Any]]) -> list[Column]:
        present = {k for r in results for k in r["metrics"]}
        cols = [Column(_SC_SHORT.get(n, n), (n,)) for n in SUGARCREPE_SUBSETS if n in present]
        cols += [Column(k, (k,)) for k in sorted(present - set(SUGARCREPE_SUBSETS) - {"replace", "swap", "add"})]
        return cols + [Column(g.capitalize(), (g,)) for g in ("replace", "swap", "add") if g in present]


@dataclass
class SugarCrepePPConfig:
    """data: folder of <subset>.json files (or one file); images: COCO val2017 folder (None = text-only: TOT)."""

    data: PathLike
    images: PathLike | None = None
    subsets: tuple[str, ...] | None = None
    name: str | None = "sugarcrepe_pp"
    skip_missing: bool = False

    def __post_init__(self):
        self.subsets = subset_names(self.subsets)


@register_task("sugarcrepe_pp", "sugarcrepe++", "sugar_crepe_pp")
class SugarCrepePPTask(Task):
    Config = SugarCrepePPConfig
    title = "SugarCrepe++ accuracy (%), ITT / TOT"
    protocol = ("ITT: s(I,P1) > s(I,N) and s(I,P2) > s(I,N); TOT: s(P1,P2) > s(P1,N) and s(P1,P2) > s(P2,N); "
                "strict (ties are wrong); per-subset accuracy in %, avg = mean over subsets.")

    def load(self) -> CaptionSetData:
        c = self.config
        return load_sugarcrepe_pp(c.data, c.images, subsets=c.subsets, skip_missing=c.skip_missing)

    def score(self, embedder: Embedder, data: CaptionSetData) -> dict[str, float]:
        images = embedder.images(data.images, desc=f"{self.name} images") if data.images is not None else None
        names = list(data.subsets)
        roles = ("caption", "caption2", "negative_caption")
        all_texts = [t for n in names for r in roles for t in data.subsets[n][r]]
        text_emb = iter(torch.split(embedder.texts(all_texts, desc=f"{self.name} captions"),
                                    [len(data.subsets[n]["ids"]) for n in names for _ in roles]))
        out: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {}
        for n in names:
            p1, p2, neg = next(text_emb), next(text_emb), next(text_emb)
            img = images[data.subsets[n]["image"]] if images is not None else None
            for metric, hits in M.sugarcrepe_pp_correct(img, p1, p2, neg).items():
                out[f"{n}_{metric}"] = M.percent(hits)
                per_metric.setdefault(metric, []).append(out[f"{n}_{metric}"])
        for metric in ("itt", "tot"):
            if metric in per_metric:
                out[f"avg_{metric}"] = sum(per_metric[metric]) / len(per_metric[metric])
        return out

    @classmethod
    def columns(cls, results: Sequence[Mapping[str, Any]]) -> list[Column]:
        present = {k for r in results for k in r["metrics"]}
        subsets = [n for n in SUGARCREPE_PP_SUBSETS if f"{n}_tot" in present]
        subsets += sorted({k[:-4] for k in present if k.endswith("_tot")} - set(subsets) - {"avg"})
        return [Column(_SC_SHORT.get(n, n), (f"{n}_itt", f"{n}_tot")) for n in subsets + ["avg"]]


@dataclass
class WinogroundConfig:
    """data: examples.jsonl (or its folder) or a datasets.save_to_disk folder; images: folder of <stem>.png
    (default: images/ next to examples.jsonl); split: for a saved DatasetDict."""

    data: PathLike
    images: PathLike | None = None
    split: str = "test"
    name: str | None = "winoground"
    skip_missing: bool = False


@register_task("winoground")
class WinogroundTask(Task):
    Config = WinogroundConfig
    title = "Winoground (%)"
    protocol = ("text: s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1); image: s(c0,i0) > s(c0,i1) and "
                "s(c1,i1) > s(c1,i0); group: both; strict (ties are wrong); in % of examples.")

    def load(self) -> WinogroundData:
        c = self.config
        return load_winoground(c.data, c.images, split=c.split, skip_missing=c.skip_missing)

    def score(self, embedder: Embedder, data: WinogroundData) -> dict[str, float]:
        images = embedder.images(data.images, desc=f"{self.name} images")
        n = len(data.caption_0)
        texts = embedder.texts(data.caption_0 + data.caption_1, desc=f"{self.name} captions")
        hits = M.winoground_correct(images[0::2], images[1::2], texts[:n], texts[n:])
        return {k: M.percent(v) for k, v in hits.items()}

    @classmethod
    def columns(cls, results: Sequence[Mapping[str, Any]]) -> list[Column]:
        return [Column("Image", ("image",)), Column("Text", ("text",)), Column("Group", ("group",))]


@dataclass
class ZeroShotClassificationConfig:
    """data: ImageFolder root (one folder per class, sorted = class index); classnames: None (open_clip's 1,000
    ImageNet names), a list, a file, or {folder: name}; templates: "openai" (80), "simple" (7), a file or a list
    (str with {} or {c}, or callables)."""

    data: PathLike
    classnames: PathLike | Sequence[str] | Mapping[str, str] | None = None
    templates: PathLike | Sequence[Any] = "openai"
    name: str | None = "imagenet"


def zero_shot_weights(embedder: Embedder, classnames: Sequence[str], templates: Sequence[Any],
                      desc: str = "class prompts") -> torch.Tensor:
    """Classifier [C, D]: per class, the mean of its normalised prompt embeddings, renormalised (as
    ``open_clip.build_zero_shot_classifier``; the prompts go through the Embedder, so they are cached)."""
    texts = [render_template(t, c) for c in classnames for t in templates]
    emb = embedder.texts(texts, desc=desc).view(len(classnames), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


@register_task("zeroshot_classification", "imagenet")
class ZeroShotClassificationTask(Task):
    Config = ZeroShotClassificationConfig
    title = "Zero-shot classification (%)"
    protocol = ("Top-k accuracy in %, classifier = mean of the normalised prompt embeddings per class "
                "(open_clip's 80 OpenAI templates by default); ties pessimistic (a tied wrong class ranks ahead); "
                "mean_per_class_recall = top-1 recall averaged over classes.")

    def load(self) -> ClassificationData:
        c = self.config
        return load_image_folder(c.data, c.classnames, c.templates)

    def score(self, embedder: Embedder, data: ClassificationData) -> dict[str, float]:
        from vladva_openclip.kernels import similarity

        weights = zero_shot_weights(embedder, data.classnames, data.templates, desc=f"{self.name} prompts")
        images = embedder.images(data.images, desc=f"{self.name} images")
        dev = embedder.device
        logits = similarity(images.to(dev), weights.to(dev), normalize=False).cpu()
        return M.classification_metrics(logits, data.targets)

    @classmethod
    def columns(cls, results: Sequence[Mapping[str, Any]]) -> list[Column]:
        present = {k for r in results for k in r["metrics"]}
        return [Column(h, (k,)) for h, k in (("Top-1", "top1"), ("Top-5", "top5")) if k in present]


def prepare_tasks(tasks: Sequence[Task | Mapping[str, Any]]) -> list[Task]:
    """Build tasks and read all their data up front, so bad input fails before any model runs."""
    built = [build_task(t) for t in tasks]
    if not built:
        raise ValueError("no tasks given")
    names = [t.name for t in built]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"several tasks are named {dupes}: give each a distinct name")
    for t in built:
        t.prepare()
    return built
