"""Compositionality benchmarks: SugarCrepe (7 subsets), SugarCrepe++ (5 subsets), Winoground.

Images are shared across subsets (all SugarCrepe subsets draw on COCO val2017), so each benchmark holds one
:class:`ImageSet` and every subset indexes into it: an image is embedded once per run.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._jsonio import as_path, read_json, read_jsonl, require_field, require_str
from .errors import AnnotationError, EmptyDatasetError, EvalDataError
from .images import ImageSet, check_missing, resolve_stem

__all__ = [
    "SUGARCREPE_PP_SUBSETS",
    "SUGARCREPE_SUBSETS",
    "CaptionSetData",
    "WinogroundData",
    "load_sugarcrepe",
    "load_sugarcrepe_pp",
    "load_winoground",
]

_logger = logging.getLogger(__name__)

#: the paper's column order (Replace obj/att/rel, Swap obj/att, Add obj/att)
SUGARCREPE_SUBSETS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
#: the paper's column order for SugarCrepe++ (Swap obj/att, Replace obj/att/rel); there are no add_* subsets
SUGARCREPE_PP_SUBSETS = ("swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel")


@dataclass
class CaptionSetData:
    """Per subset, each example pairs one image with several captions of fixed roles.

    images: distinct images across all subsets (None for a text-only run); subsets[name] holds
    ``image`` (LongTensor [n] into images, or None), ``ids`` (list[str]) and one list[str] per caption role,
    e.g. ``caption``/``negative_caption`` (SugarCrepe) or ``caption``/``caption2``/``negative_caption`` (++).
    """

    images: ImageSet | None
    subsets: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class WinogroundData:
    """images: 2n distinct images, example k uses images 2k (image_0) and 2k+1 (image_1);
    caption_0 / caption_1: list[str] of n; ids and tags: per example."""

    images: ImageSet
    caption_0: list[str]
    caption_1: list[str]
    ids: list[str]
    tags: list[str | None]
    info: dict[str, Any] = field(default_factory=dict)


def _subset_files(data: Path, subsets: Sequence[str] | None, known: Sequence[str], what: str) -> dict[str, Path]:
    """Map subset name -> JSON file, from a folder of ``<subset>.json`` files or a single file."""
    if data.is_file():
        name = data.stem
        if subsets is not None and list(subsets) != [name]:
            raise EvalDataError(f"{data} is the single subset {name!r}, but subsets={list(subsets)} were asked for")
        return {name: data}
    wanted = list(subsets) if subsets is not None else list(known)
    files = {name: data / f"{name}.json" for name in wanted}
    absent = [str(p) for p in files.values() if not p.is_file()]
    if subsets is None:  # default: whatever standard subsets are present
        files = {k: p for k, p in files.items() if p.is_file()}
        if not files:
            raise EmptyDatasetError(f"{what}: no subset files in {data} (expected some of "
                                    f"{', '.join(n + '.json' for n in known)})")
    elif absent:
        raise EvalDataError(f"{what}: subset file(s) not found: {', '.join(absent)}")
    return files


def _rows(obj: Any, path: Path) -> list[tuple[str, Any]]:
    """``(id, entry)`` pairs from a dict keyed by id (SugarCrepe) or a list (SugarCrepe++; id = position)."""
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, list):
        return [(str(i), v) for i, v in enumerate(obj)]
    raise AnnotationError(path, None, f"expected a JSON object keyed by example id or a list, got "
                                      f"{type(obj).__name__}")


def _load_caption_sets(
    data: str | os.PathLike, images: str | os.PathLike | None, subsets: Sequence[str] | None,
    known: Sequence[str], roles: Sequence[str], what: str, skip_missing: bool, need_images: bool,
) -> CaptionSetData:
    files = _subset_files(as_path(data, f"{what} annotations"), subsets, known, what)
    root = as_path(images, f"{what} images folder") if images is not None else None
    if root is None and need_images:
        raise EvalDataError(f"{what}: an images folder is required (COCO val2017 images; pass --images)")
    parsed: dict[str, list[tuple[str, str, list[str]]]] = {}
    for name, path in files.items():
        rows = []
        for ex_id, entry in _rows(read_json(path), path):
            where = f"{ex_id!r}"
            filename = require_str(entry, "filename", path, where)
            rows.append((ex_id, filename, [require_str(entry, r, path, where) for r in roles]))
        if not rows:
            raise EmptyDatasetError(f"{what}: {path} has no examples")
        parsed[name] = rows

    missing: set[str] = set()
    if root is not None:
        all_paths = [str(root / fn) for rows in parsed.values() for _, fn, _ in rows]
        missing = check_missing(all_paths, f"{what} (images under {root})", skip_missing)
    index: dict[str, int] = {}
    out: dict[str, dict[str, Any]] = {}
    dropped = 0
    for name, rows in parsed.items():
        keep = [r for r in rows if root is None or str(root / r[1]) not in missing]
        dropped += len(rows) - len(keep)
        if not keep:
            raise EmptyDatasetError(f"{what}: every image of subset {name!r} is missing")
        subset: dict[str, Any] = {"ids": [r[0] for r in keep]}
        if root is not None:
            subset["image"] = torch.tensor([index.setdefault(str(root / r[1]), len(index)) for r in keep])
        for k, role in enumerate(roles):
            subset[role] = [r[2][k] for r in keep]
        out[name] = subset
    if dropped:
        _logger.warning("%s: skipped %d examples whose image is missing", what, dropped)
    image_set = ImageSet.from_paths(list(index)) if root is not None else None
    info = {"files": {k: str(v) for k, v in files.items()}, "images_root": str(root) if root else None,
            "n_examples": {k: len(v["ids"]) for k, v in out.items()}, "n_images": len(index),
            "n_missing_images": len(missing), "n_skipped_examples": dropped}
    return CaptionSetData(image_set, out, info)


def load_sugarcrepe(data: str | os.PathLike, images: str | os.PathLike | None, *,
                    subsets: Sequence[str] | None = None, skip_missing: bool = False) -> CaptionSetData:
    """SugarCrepe: ``data`` is the folder of ``<subset>.json`` files (or one of them); ``images`` holds val2017.

    Each file maps an example id to ``{"filename", "caption", "negative_caption"}``.
    """
    return _load_caption_sets(data, images, subsets, SUGARCREPE_SUBSETS, ("caption", "negative_caption"),
                              "SugarCrepe", skip_missing, need_images=True)


def load_sugarcrepe_pp(data: str | os.PathLike, images: str | os.PathLike | None, *,
                       subsets: Sequence[str] | None = None, skip_missing: bool = False) -> CaptionSetData:
    """SugarCrepe++: a list of ``{"id", "filename", "caption", "caption2", "negative_caption"}`` per subset file.

    Without ``images`` only the text-only task (TOT) can be scored.
    """
    return _load_caption_sets(data, images, subsets, SUGARCREPE_PP_SUBSETS,
                              ("caption", "caption2", "negative_caption"), "SugarCrepe++", skip_missing,
                              need_images=False)


def _is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json",
                                                                  "state.json"))


def load_winoground(data: str | os.PathLike, images: str | os.PathLike | None = None, *,
                    split: str = "test", skip_missing: bool = False) -> WinogroundData:
    """Winoground from a local copy of the original files or from a ``datasets.save_to_disk`` folder.

    Original layout: ``data`` is ``examples.jsonl`` or the folder holding it; each line has ``id``, ``image_0``,
    ``image_1`` (file stems such as ``ex_0_img_0``), ``caption_0``, ``caption_1`` (and tags); images are in
    ``images`` (default: ``images/`` next to ``examples.jsonl``) as ``<stem>.png`` (other extensions accepted).
    A saved Hugging Face dataset (needs the ``datasets`` package) is read with its ``split`` (default "test").
    """
    path = as_path(data, "Winoground data")
    if _is_saved_hf_dataset(path):
        return _winoground_from_hf(path, split)
    jsonl = path / "examples.jsonl" if path.is_dir() else path
    if not jsonl.is_file():
        raise EvalDataError(f"Winoground: {path} has no examples.jsonl and is not a saved Hugging Face dataset")
    root = as_path(images, "Winoground images folder") if images is not None else as_path(
        jsonl.parent / "images", "Winoground images folder (default: images/ next to examples.jsonl)")
    rows = []
    for lineno, entry in read_jsonl(jsonl):
        where = f"at line {lineno}"
        ex_id = str(require_field(entry, "id", jsonl, where))
        stems = [require_str(entry, f"image_{k}", jsonl, where) for k in (0, 1)]
        caps = [require_str(entry, f"caption_{k}", jsonl, where) for k in (0, 1)]
        rows.append((ex_id, [str(resolve_stem(root, s)) for s in stems], caps, entry.get("tag")))
    if not rows:
        raise EmptyDatasetError(f"Winoground: {jsonl} has no examples")
    missing = check_missing([p for r in rows for p in r[1]], f"Winoground ({jsonl}, images under {root})",
                            skip_missing)
    keep = [r for r in rows if not (set(r[1]) & missing)]
    if not keep:
        raise EmptyDatasetError(f"Winoground: every example of {jsonl} has a missing image")
    info = {"source": str(jsonl), "images_root": str(root), "n_examples": len(keep),
            "n_missing_images": len(missing), "n_skipped_examples": len(rows) - len(keep)}
    return WinogroundData(ImageSet.from_paths([p for r in keep for p in r[1]]), [r[2][0] for r in keep],
                          [r[2][1] for r in keep], [r[0] for r in keep], [r[3] for r in keep], info)


def _winoground_from_hf(path: Path, split: str) -> WinogroundData:
    try:
        import datasets  # optional dependency, imported only for this input form
    except ImportError as err:
        raise EvalDataError(f"Winoground: {path} is a saved Hugging Face dataset, which needs the 'datasets' "
                            "package (pip install datasets); or use the original examples.jsonl + images "
                            "folder instead") from err
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, (getattr(datasets, "DatasetDict", dict), dict)):  # several splits were saved
        if split not in ds:
            raise EvalDataError(f"Winoground: {path} has splits {sorted(ds.keys())}, not {split!r}")
        ds = ds[split]
    pil, ids, ex_ids, cap0, cap1, tags = [], [], [], [], [], []
    for i, row in enumerate(ds):
        where = f"row {i}"
        ex_id = str(require_field(row, "id", path, where))
        ex_ids.append(ex_id)
        for k in (0, 1):
            im = require_field(row, f"image_{k}", path, where)
            if not hasattr(im, "convert"):
                raise AnnotationError(path, where, f"image_{k} is not an image (got {type(im).__name__})")
            pil.append(im)
            ids.append(f"{ex_id}/image_{k}")
        cap0.append(require_str(row, "caption_0", path, where))
        cap1.append(require_str(row, "caption_1", path, where))
        tags.append(row.get("tag"))
    if not cap0:
        raise EmptyDatasetError(f"Winoground: {path} (split {split!r}) has no examples")
    info = {"source": str(path), "split": split, "n_examples": len(cap0), "n_missing_images": 0,
            "n_skipped_examples": 0}
    return WinogroundData(ImageSet.from_pil(pil, ids), cap0, cap1, ex_ids, tags, info)
