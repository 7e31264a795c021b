"""Zero-shot classification data: an ImageFolder tree plus class names and prompt templates.

Class folders are taken in sorted order (as torchvision's ImageFolder does), so for ImageNet val laid out as
``<root>/<wnid>/*.JPEG`` the 1,000 folders line up with open_clip's ``IMAGENET_CLASSNAMES``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch

from ._jsonio import as_path
from .errors import AnnotationError, EmptyDatasetError, EvalDataError
from .images import IMAGE_EXTENSIONS, ImageSet

__all__ = ["TEMPLATE_SETS", "ClassificationData", "load_image_folder", "render_template", "resolve_templates"]

Template = str | Callable[[str], str]

#: named template sets; "openai" is the 80 prompts of the CLIP paper that open_clip and CLIP_benchmark use
TEMPLATE_SETS: dict[str, Sequence[Template]] = {
    "openai": open_clip.OPENAI_IMAGENET_TEMPLATES,
    "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES,
}


@dataclass
class ClassificationData:
    """images: N images; targets: LongTensor [N] of class indices; classnames: C names; templates: T prompts."""

    images: ImageSet
    targets: torch.Tensor
    classnames: list[str]
    templates: list[Template]
    info: dict[str, Any] = field(default_factory=dict)


def render_template(template: Template, classname: str) -> str:
    """Fill a prompt: callables are called, strings use ``{}`` (open_clip) or ``{c}`` (CLIP_benchmark)."""
    if callable(template):
        return template(classname)
    return template.format(c=classname) if "{c}" in template else template.format(classname)


def _read_list(path: Path) -> list[str]:
    """A JSON list, or one entry per non-blank line of a text file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(path, None, f"cannot be read as UTF-8 text ({err})") from None
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise AnnotationError(path, None, f"not valid JSON (line {err.lineno}, column {err.colno}: "
                                              f"{err.msg})") from None
        if not isinstance(obj, list):
            raise AnnotationError(path, None, f"expected a JSON list of strings, got a {type(obj).__name__}")
        bad = next((i for i, x in enumerate(obj) if not isinstance(x, str)), None)
        if bad is not None:
            raise AnnotationError(path, f"[{bad}]", f"expected a string, got {type(obj[bad]).__name__}")
        return obj
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_templates(templates: str | os.PathLike | Sequence[Template]) -> list[Template]:
    """A named set ("openai", "simple"), a file (JSON list or one template per line), or a list."""
    if isinstance(templates, (str, os.PathLike)):
        if str(templates) in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[str(templates)])
        path = Path(templates)
        if not path.is_file():
            raise EvalDataError(f"templates {templates!r}: not a named set ({', '.join(TEMPLATE_SETS)}) "
                                "and not a file")
        out: list[Template] = list(_read_list(path))
        source: Path | None = path
    else:
        out = list(templates)
        source = None
    if not out:
        raise EvalDataError(f"{source}: holds no prompt templates" if source else "no prompt templates given")
    for i, t in enumerate(out):
        if isinstance(t, str) and "{}" not in t and "{c}" not in t:
            problem = f"template {t!r} has no '{{}}' or '{{c}}' placeholder for the class name"
            if source is not None:
                raise AnnotationError(source, f"[{i}]", problem)
            raise EvalDataError(problem)
    return out


def _resolve_classnames(classnames: str | os.PathLike | Sequence[str] | Mapping[str, str] | None,
                        folders: list[str], root: Path) -> list[str]:
    if classnames is None:
        names = list(open_clip.IMAGENET_CLASSNAMES)
        if len(names) != len(folders):
            raise EvalDataError(f"{root} has {len(folders)} class folders, but the default class names are "
                                f"ImageNet's {len(names)}: pass classnames (a list, a file, or a mapping from "
                                "folder name to class name)")
        return names
    if isinstance(classnames, Mapping):
        absent = [f for f in folders if f not in classnames]
        if absent:
            raise EvalDataError(f"classnames mapping has no name for folder(s) {absent[:5]} of {root}")
        return [classnames[f] for f in folders]
    names = _read_list(Path(classnames)) if isinstance(classnames, (str, os.PathLike)) else list(classnames)
    if len(names) != len(folders):
        raise EvalDataError(f"{len(names)} class names given but {root} has {len(folders)} class folders "
                            "(names are matched to the folders in sorted order)")
    return names


def load_image_folder(root: str | os.PathLike,
                      classnames: str | os.PathLike | Sequence[str] | Mapping[str, str] | None = None,
                      templates: str | os.PathLike | Sequence[Template] = "openai") -> ClassificationData:
    """Read ``root/<class folder>/<image>``; folders sorted by name give the class indices."""
    path = as_path(root, "ImageFolder root")
    if not path.is_dir():
        raise EvalDataError(f"{path} is not a folder (expected one subfolder per class)")
    folders = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not folders:
        raise EmptyDatasetError(f"{path} has no class subfolders")
    names = _resolve_classnames(classnames, folders, path)
    files, targets = [], []
    for idx, folder in enumerate(folders):
        for dirpath, _, filenames in sorted(os.walk(path / folder, followlinks=True)):
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, fn))
                    targets.append(idx)
    if not files:
        raise EmptyDatasetError(f"{path}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    info = {"root": str(path), "n_images": len(files), "n_classes": len(folders),
            "n_classes_with_images": len(set(targets))}
    return ClassificationData(ImageSet.from_paths(files), torch.tensor(targets, dtype=torch.long), names,
                              resolve_templates(templates), info)
