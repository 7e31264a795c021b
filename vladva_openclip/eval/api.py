"""Python API: evaluate a built model (:func:`evaluate`) or several named models side by side
(:func:`evaluate_models`), on any registered tasks."""
from __future__ import annotations

import datetime
import gc
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import open_clip
import torch

from .embed import EmbedConfig, Embedder, model_precision
from .report import Report
from .tasks import Task, build_task

__all__ = [
    "ModelLoadError",
    "ModelSpec",
    "evaluate",
    "evaluate_models",
    "load_model",
    "parse_model_spec",
    "prepare_tasks",
]

_logger = logging.getLogger(__name__)

_SCHEMAS = ("hf-hub:", "local-dir:")


class ModelLoadError(RuntimeError):
    """A model could not be built; ``report`` holds the results of the models evaluated before it."""

    def __init__(self, message: str, report: Report):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ModelSpec:
    """An open_clip model name and optional pretrained tag or checkpoint path."""

    name: str
    pretrained: str | None = None

    @property
    def label(self) -> str:
        if not self.pretrained:
            return self.name
        tag = os.path.basename(self.pretrained) if os.path.sep in self.pretrained else self.pretrained
        return f"{self.name} ({tag})"

    @property
    def model_id(self) -> str:
        """Identity of the weights for the cache key: a checkpoint file adds its path, size and mtime."""
        ident = f"{self.name}|{self.pretrained or ''}"
        if self.pretrained and os.path.isfile(self.pretrained):
            st = os.stat(self.pretrained)
            ident += f"|{os.path.abspath(self.pretrained)}|{st.st_size}|{st.st_mtime_ns}"
        return ident


def parse_model_spec(text: str) -> ModelSpec:
    """``"NAME[:PRETRAINED]"``; a schema prefix (``hf-hub:``, ``local-dir:``) belongs to the name."""
    prefix = next((s for s in _SCHEMAS if text.startswith(s)), "")
    name, sep, pretrained = text[len(prefix):].partition(":")
    if not name:
        raise ValueError(f"bad model spec {text!r}: expected NAME or NAME:PRETRAINED")
    return ModelSpec(prefix + name, pretrained if sep and pretrained else None)


def load_model(spec: ModelSpec, *, device: str | torch.device = "cpu",
               precision: str = "fp32") -> tuple[torch.nn.Module, Callable, Callable]:
    """``open_clip.create_model_and_transforms`` + ``get_tokenizer``; the val transform; model in eval mode."""
    import vladva_openclip  # noqa: F401  (importing the package registers the VladVA models with open_clip)

    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.name, pretrained=spec.pretrained, precision=model_precision(precision), device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec.name)


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


def _environment() -> dict[str, Any]:
    import vladva_openclip

    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "vladva_openclip": vladva_openclip.__version__, "open_clip": open_clip.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def evaluate(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    tasks: Sequence[Task | Mapping[str, Any]],
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate one built model on the tasks.

    model/preprocess/tokenizer: as from ``open_clip.create_model_and_transforms`` / ``get_tokenizer`` (only
    ``encode_image``/``encode_text`` are used); tasks: Task objects or dicts ``{"task": type, ...}``;
    device: moves the model there (None: leave it where it is); precision: "fp32", "amp", "amp_bf16" (autocast;
    casting weights is the caller's business here); cache_dir: embedding cache (None: no cache);
    model_id: names the weights in the cache key (the weights are hashed too).
    Returns ``{task name: {"task", "name", "metrics": {key: percent}, "info": {...}, "seconds"}}``.
    """
    prepared = prepare_tasks(tasks)
    if device is not None:
        model.to(device)
    model.eval()
    config = EmbedConfig(batch_size=batch_size, precision=precision, num_workers=num_workers,
                         cache_dir=None if cache_dir is None else str(cache_dir), progress=progress)
    embedder = Embedder(model, preprocess, tokenizer, config, device=device, model_id=model_id)
    results = {}
    for task in prepared:
        start = time.perf_counter()
        results[task.name] = {**task.run(embedder), "seconds": round(time.perf_counter() - start, 3)}
        _logger.info("%s: %s", task.name, results[task.name]["metrics"])
    return results


def evaluate_models(
    models: Sequence[ModelSpec | str],
    tasks: Sequence[Task | Mapping[str, Any]],
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    loader: Callable[..., tuple[torch.nn.Module, Callable, Callable]] = load_model,
) -> Report:
    """Build each model in turn (``"NAME[:PRETRAINED]"`` or ModelSpec), evaluate it on every task, free it.

    precision also sets how the weights are built (fp16/bf16/pure_* cast them, amp/amp_bf16 autocast).
    Returns a :class:`Report` (``.save(dir)`` writes results.json and results.md). A model that cannot be built
    raises :class:`ModelLoadError`, which carries the report of the models done so far.
    """
    specs = [parse_model_spec(m) if isinstance(m, str) else m for m in models]
    if not specs:
        raise ValueError("no models given")
    prepared = prepare_tasks(tasks)
    report = Report(meta={**_environment(), "device": str(device), "precision": precision,
                          "batch_size": batch_size},
                    models=[{"label": s.label, "name": s.name, "pretrained": s.pretrained} for s in specs])
    for spec in specs:
        _logger.info("building %s", spec.label)
        try:
            model, preprocess, tokenizer = loader(spec, device=device, precision=precision)
        except Exception as err:  # unknown name, bad tag, unreadable checkpoint: say which model, keep results
            raise ModelLoadError(f"cannot build model {spec.name!r} (pretrained={spec.pretrained!r}): "
                                 f"{type(err).__name__}: {err}", report) from err
        results = evaluate(model, preprocess, tokenizer, prepared, device=device, precision=precision,
                           batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir,
                           model_id=spec.model_id, progress=progress)
        for result in results.values():
            report.add(spec.label, result)
        del model, preprocess, tokenizer
        if torch.cuda.is_available():  # hand the weights' memory back before the next model is built
            gc.collect()
            torch.cuda.empty_cache()
    return report
