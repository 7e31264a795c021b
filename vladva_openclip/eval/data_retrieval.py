"""Image-text retrieval datasets: Karpathy ``dataset_*.json``, per-image ``{"image", "caption": [...]}`` lists
(BLIP/ALBEF files), and COCO captions format (nocaps val).

Captions are used verbatim (stripped of surrounding whitespace): no BLIP-style lowercasing or punctuation removal,
which would change the text the model sees. Every caption of an image is kept (COCO 5K test: 25,010 captions).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._jsonio import as_path, read_json, require_field, require_str
from .errors import AnnotationError, EmptyDatasetError
from .images import ImageSet, check_missing

__all__ = ["RETRIEVAL_FORMATS", "RetrievalData", "RetrievalFormat", "load_retrieval"]

_logger = logging.getLogger(__name__)


@dataclass
class RetrievalData:
    """A retrieval benchmark: ``captions[j]`` describes image ``caption_image[j]``.

    images: the gallery of distinct images (N); captions: all captions (M >= N), grouped by image;
    caption_image: LongTensor [M] with values in [0, N); info: counts and what was dropped.
    """

    images: ImageSet
    captions: list[str]
    caption_image: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    where: str                 # entry position for error messages, e.g. "images[12]"
    candidates: tuple[str, ...]  # relative image paths to try under the images root, first one preferred
    captions: tuple[str, ...]


@dataclass(frozen=True)
class RetrievalFormat:
    """One annotation layout: ``detect(obj)`` says whether the parsed JSON has it, ``entries`` reads it."""

    name: str
    detect: Callable[[Any], bool]
    entries: Callable[[Any, Path, str | None, dict[str, Any]], Iterator[_Entry]]


def _karpathy_entries(obj: dict, path: Path, split: str | None, options: dict[str, Any]) -> Iterator[_Entry]:
    images = obj["images"]
    splits_seen: set[str] = set()
    for i, img in enumerate(images):
        where = f"images[{i}]"
        img_split = require_str(img, "split", path, where)
        splits_seen.add(img_split)
        if split is not None and img_split != split:
            continue
        filename = require_str(img, "filename", path, where)
        sentences = require_field(img, "sentences", path, where)
        if not isinstance(sentences, list) or not sentences:
            raise AnnotationError(path, where, "'sentences' must be a non-empty list")
        captions = []
        for j, sent in enumerate(sentences):
            if isinstance(sent, dict) and "raw" not in sent and isinstance(sent.get("tokens"), list):
                captions.append(" ".join(sent["tokens"]))  # some re-exports keep only tokens
            else:
                captions.append(require_str(sent, "raw", path, f"{where}.sentences[{j}]").strip())
        filepath = img.get("filepath")
        candidates = (f"{filepath}/{filename}", filename) if filepath else (filename,)
        yield _Entry(where, candidates, tuple(captions))
    options["_splits_seen"] = sorted(splits_seen)


def _per_image_entries(obj: list, path: Path, split: str | None, options: dict[str, Any]) -> Iterator[_Entry]:
    # Test files hold one row per image with a caption list; train files one row per caption: group by image.
    order: list[str] = []
    grouped: dict[str, list[str]] = {}
    first_row: dict[str, int] = {}
    for i, row in enumerate(obj):
        where = f"[{i}]"
        image = require_str(row, "image", path, where)
        caption = require_field(row, "caption", path, where)
        caps = [caption] if isinstance(caption, str) else caption
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise AnnotationError(path, where, "'caption' must be a non-empty string or a non-empty list of them")
        if image not in grouped:
            order.append(image)
            grouped[image] = []
            first_row[image] = i
        grouped[image].extend(c.strip() for c in caps)
    for image in order:
        yield _Entry(f"[{first_row[image]}]", (image,), tuple(grouped[image]))


def _require_id(entry: Any, field: str, path: Path, where: str) -> int | str:
    value = require_field(entry, field, path, where)
    if not isinstance(value, (int, str)) or isinstance(value, bool):
        raise AnnotationError(path, where, f"field {field!r} must be an integer or a string, got {value!r:.60}")
    return value


def _coco_entries(obj: dict, path: Path, split: str | None, options: dict[str, Any]) -> Iterator[_Entry]:
    domain = options.get("domain")
    captions: dict[Any, list[str]] = {}
    for i, ann in enumerate(obj["annotations"]):
        where = f"annotations[{i}]"
        image_id = _require_id(ann, "image_id", path, where)
        captions.setdefault(image_id, []).append(require_str(ann, "caption", path, where).strip())
    known_ids = set()
    no_caption = 0
    for i, img in enumerate(obj["images"]):
        where = f"images[{i}]"
        image_id = _require_id(img, "id", path, where)
        known_ids.add(image_id)
        file_name = require_str(img, "file_name", path, where)
        if domain is not None and img.get("domain") != domain:
            continue
        if image_id not in captions:
            no_caption += 1
            continue
        yield _Entry(where, (file_name,), tuple(captions[image_id]))
    orphans = [k for k in captions if k not in known_ids]
    if orphans:
        raise AnnotationError(path, f"annotations with image_id {orphans[0]!r}",
                              f"{len(orphans)} image_id value(s) have no entry in 'images'")
    if no_caption:
        _logger.warning("%s: %d image(s) have no caption and are left out of retrieval", path, no_caption)
    options["_images_without_captions"] = no_caption


#: detection order matters: COCO files also have "images", so they are recognised by "annotations" first
RETRIEVAL_FORMATS: list[RetrievalFormat] = [
    RetrievalFormat("coco_captions",
                    lambda o: isinstance(o, dict) and "annotations" in o and "images" in o, _coco_entries),
    RetrievalFormat("karpathy", lambda o: isinstance(o, dict) and isinstance(o.get("images"), list),
                    _karpathy_entries),
    RetrievalFormat("per_image", lambda o: isinstance(o, list), _per_image_entries),
]


def load_retrieval(
    data: str | os.PathLike,
    images: str | os.PathLike | None = None,
    *,
    split: str | None = "test",
    skip_missing: bool = False,
    domain: str | None = None,
) -> RetrievalData:
    """Read a retrieval annotation file of any supported format.

    data: the JSON file; images: the folder the image paths are relative to (default: the JSON's folder);
    split: Karpathy split to keep ("test", "val", ...; None keeps all; ignored by the other formats);
    domain: nocaps domain filter ("in-domain", "near-domain", "out-domain"; COCO format only).
    """
    path = as_path(data, "retrieval annotation file")
    root = as_path(images, "images folder") if images is not None else path.parent
    obj = read_json(path)
    fmt = next((f for f in RETRIEVAL_FORMATS if f.detect(obj)), None)
    if fmt is None:
        raise AnnotationError(path, None, "unknown retrieval format: expected a Karpathy dataset_*.json "
                              "({'images': [{'filename', 'split', 'sentences'}]}), a list of "
                              "{'image', 'caption': [...]}, or COCO captions ({'images', 'annotations'})")
    options: dict[str, Any] = {"domain": domain}
    entries = list(fmt.entries(obj, path, split, options))
    if not entries:
        hint = f" (splits in the file: {options['_splits_seen']})" if options.get("_splits_seen") else ""
        raise EmptyDatasetError(f"{path}: no images with captions for split={split!r}{hint}")

    resolved = [_resolve(root, e.candidates) for e in entries]
    missing = check_missing(resolved, f"{path} (images under {root})", skip_missing)
    if missing:
        _logger.warning("%s: skipping %d missing images", path, len(missing))
    paths, captions, owner = [], [], []
    seen: dict[str, int] = {}
    for entry, p in zip(entries, resolved):
        if p in missing:
            continue
        if p in seen:  # the same image listed twice: merge its captions so it is one gallery item
            idx = seen[p]
        else:
            idx = seen[p] = len(paths)
            paths.append(p)
        captions.extend(entry.captions)
        owner.extend([idx] * len(entry.captions))
    if not paths:
        raise EmptyDatasetError(f"{path}: every image is missing; nothing to evaluate")
    info = {"format": fmt.name, "annotation_file": str(path), "images_root": str(root), "split": split,
            "n_images": len(paths), "n_captions": len(captions), "n_missing_images": len(missing)}
    if options.get("_images_without_captions"):
        info["n_images_without_captions"] = options["_images_without_captions"]
    return RetrievalData(ImageSet.from_paths(paths), captions, torch.tensor(owner, dtype=torch.long), info)


def _resolve(root: Path, candidates: tuple[str, ...]) -> str:
    for rel in candidates:
        p = root / rel
        if p.is_file():
            return str(p)
    return str(root / candidates[0])
