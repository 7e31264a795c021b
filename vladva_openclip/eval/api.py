"""Python API: evaluate a built model (:func:`evaluate`) or several named models side by side
(:func:`evaluate_models`), on any registered tasks."""
from __future__ import annotations

import datetime
import gc
import logging
import os
import platform
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import open_clip
import torch

from .embed import EmbedConfig, Embedder, model_precision
from .errors import UnreadableImageError, UnreadableImagesError
from .generative import GenerativeConfig, GenerativeScorer, check_generative_tasks, run_generative
from .images import ImageSet, unreadable_images
from .report import Report
from .tasks import Task, prepare_tasks

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
#: unreadable image files each prepared task left out (path -> reason), reported in its results' info
_SKIPPED_UNREADABLE: weakref.WeakKeyDictionary[Task, dict[str, str]] = weakref.WeakKeyDictionary()
#: how many of them the info lists by name (the count is always exact)
LISTED_UNREADABLE = 50
#: how a caption is scored for an image (``evaluate(..., scoring=...)``, ``vladva-eval --scoring``)
SCORINGS = ("embedding", "generative")


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


def _rerun_without_unreadable(task: Task, embedder: Embedder,
                              error: UnreadableImageError) -> tuple[Task, dict[str, Any]]:
    """An image of ``task`` failed to decode while embedding: find every such file of the task (one decoding pass),
    then either stop with an error naming them or, with ``skip_missing``, read the task again without them and run
    it. Returns the task actually run and its result."""
    images = getattr(task.prepare(), "images", None)
    bad = images.find_unreadable(progress=embedder.config.progress) if isinstance(images, ImageSet) else {}
    if not bad:  # not an image of this task's set (e.g. one a custom task loads itself)
        raise error
    can_skip = hasattr(task.config, "skip_missing")
    if not (can_skip and task.config.skip_missing):
        raise UnreadableImagesError(f"{task.name} (images of {len(images)})", bad, len(images), can_skip)
    _logger.warning("%s: %d unreadable images found while embedding; evaluating without them", task.name, len(bad))
    bad = {**_SKIPPED_UNREADABLE.get(task, {}), **bad}
    fresh = type(task)(task.config)
    with unreadable_images(bad):
        fresh.prepare()
    _SKIPPED_UNREADABLE[fresh] = bad
    return fresh, fresh.run(embedder)


def _with_unreadable_info(task: Task, result: dict[str, Any]) -> dict[str, Any]:
    """Count (and list) the unreadable image files the task left out, if any, in its result's info."""
    skipped = _SKIPPED_UNREADABLE.get(task, {})
    if not skipped:
        return result
    info = dict(result.get("info", {}))
    missing = info.get("n_missing_images")
    if isinstance(missing, int) and missing >= len(skipped):
        info["n_missing_images"] = missing - len(skipped)  # the loaders count every file they left out
    info["n_unreadable_images"] = len(skipped)
    info["unreadable_images"] = dict(list(skipped.items())[:LISTED_UNREADABLE])
    return {**result, "info": info}


def _run_tasks(embedder: Embedder, prepared: list[Task],
               on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run every task with ``embedder``. A task re-read without its unreadable images replaces the original in
    ``prepared`` (later models then skip those images up front). ``on_result`` sees each result as it is done."""
    results = {}
    for i, task in enumerate(prepared):
        start = time.perf_counter()
        try:
            result = task.run(embedder)
        except UnreadableImageError as err:
            task, result = _rerun_without_unreadable(task, embedder, err)
            prepared[i] = task
        result = {**_with_unreadable_info(task, result), "seconds": round(time.perf_counter() - start, 3)}
        results[task.name] = result
        _logger.info("%s: %s", task.name, result["metrics"])
        if on_result is not None:
            on_result(result)
    return results


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
    scoring: str = "embedding",
) -> dict[str, dict[str, Any]]:
    """Evaluate one built model on the tasks.

    model/preprocess/tokenizer: as from ``open_clip.create_model_and_transforms`` / ``get_tokenizer`` (only
    ``encode_image``/``encode_text`` are used); tasks: Task objects or dicts ``{"task": type, ...}``;
    device: moves the model there (None: leave it where it is); precision: "fp32", "amp", "amp_bf16" (autocast;
    casting weights is the caller's business here); cache_dir: embedding cache (None: no cache);
    model_id: names the weights in the cache key (the weights are hashed too); scoring: ``"embedding"`` (cosine of
    the towers' embeddings) or ``"generative"`` (the LVLM's log-likelihood of each caption given the image, VladVA
    models and pair tasks only, see :mod:`.generative`).
    Returns ``{task name: {"task", "name", "metrics": {key: percent}, "info": {...}, "seconds"}}``; ``info``
    counts the image files left out as unreadable (``n_unreadable_images``, with ``skip_missing``).
    Raises :class:`~.errors.UnreadableImagesError` (naming the files) when an image cannot be decoded and the
    task does not skip missing images.
    """
    prepared = prepare_tasks(tasks)
    if scoring == "generative":
        return run_generative(_scorer(model, preprocess, tokenizer, device, batch_size, progress), prepared)
    _check_scoring(scoring)
    return _run_tasks(_embedder(model, preprocess, tokenizer, device=device, precision=precision,
                                batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir,
                                model_id=model_id, progress=progress), prepared)


def _check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")


def _scorer(model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, device, batch_size: int,
            progress: bool) -> GenerativeScorer:
    return GenerativeScorer(model, preprocess, tokenizer, GenerativeConfig(batch_size=batch_size, progress=progress),
                            device=device)


def _embedder(model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, *, device, precision: str,
              batch_size: int, num_workers: int, cache_dir, model_id: str | None, progress: bool) -> Embedder:
    if device is not None:
        model.to(device)
    model.eval()
    config = EmbedConfig(batch_size=batch_size, precision=precision, num_workers=num_workers,
                         cache_dir=None if cache_dir is None else str(cache_dir), progress=progress)
    return Embedder(model, preprocess, tokenizer, config, device=device, model_id=model_id)


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
    output_dir: str | os.PathLike | None = None,
    scoring: str = "embedding",
) -> Report:
    """Build each model in turn (``"NAME[:PRETRAINED]"`` or ModelSpec), evaluate it on every task, free it.

    precision also sets how the weights are built (fp16/bf16/pure_* cast them, amp/amp_bf16 autocast).
    Returns a :class:`Report` (``.save(dir)`` writes results.json and results.md). A model that cannot be built
    raises :class:`ModelLoadError`, which carries the report of the models done so far.
    output_dir: if given, the report is saved there (atomically) after every task and when the run stops on an
    error, so results.json always holds the tasks that finished; ``meta["status"]`` is "running", "complete" or
    "failed" (then ``meta["error"]`` says why). scoring: as :func:`evaluate`'s.
    """
    _check_scoring(scoring)
    specs = [parse_model_spec(m) if isinstance(m, str) else m for m in models]
    if not specs:
        raise ValueError("no models given")
    prepared = prepare_tasks(tasks)
    if scoring == "generative":
        check_generative_tasks(prepared)
    report = Report(meta={**_environment(), "device": str(device), "precision": precision,
                          "batch_size": batch_size, "scoring": scoring, "status": "running"},
                    models=[{"label": s.label, "name": s.name, "pretrained": s.pretrained} for s in specs])

    def save() -> None:
        if output_dir is not None:
            report.save(output_dir)

    try:
        for spec in specs:
            _logger.info("building %s", spec.label)
            try:
                model, preprocess, tokenizer = loader(spec, device=device, precision=precision)
            except Exception as err:  # unknown name, bad tag, unreadable checkpoint: say which model, keep results
                raise ModelLoadError(f"cannot build model {spec.name!r} (pretrained={spec.pretrained!r}): "
                                     f"{type(err).__name__}: {err}", report) from err
            def add(result: dict[str, Any], label: str = spec.label) -> None:
                report.add(label, result)
                save()

            if scoring == "generative":
                try:
                    embedder = _scorer(model, preprocess, tokenizer, device, batch_size, progress)
                except TypeError as err:  # not an LVLM: say which model, keep the results so far
                    raise ModelLoadError(f"cannot score model {spec.name!r} generatively: {err}", report) from err
                run_generative(embedder, prepared, on_result=add)
            else:
                embedder = _embedder(model, preprocess, tokenizer, device=device, precision=precision,
                                     batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir,
                                     model_id=spec.model_id, progress=progress)
                _run_tasks(embedder, prepared, on_result=add)
            del model, preprocess, tokenizer, embedder
            if torch.cuda.is_available():  # hand the weights' memory back before the next model is built
                gc.collect()
                torch.cuda.empty_cache()
    except BaseException as err:  # an interrupt too: what finished is saved before the run stops
        report.meta.update(status="failed", error=f"{type(err).__name__}: {err}")
        save()
        raise
    report.meta["status"] = "complete"
    report.meta.pop("error", None)
    save()
    return report
