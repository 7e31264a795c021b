"""Image collections for evaluation: files on disk or in-memory PIL images, each with a stable fingerprint."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import MissingImagesError

__all__ = ["IMAGE_EXTENSIONS", "ImageSet", "check_missing", "find_missing", "resolve_stem"]

#: file name endings accepted as images (torchvision's ImageFolder list)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageSet:
    """An ordered collection of distinct images.

    ``keys[i]`` names image ``i`` (a file path or an id); ``load(i)`` returns it as an RGB PIL image;
    ``fingerprint`` changes whenever any image could have changed (path, size and mtime for files; pixel hash for
    in-memory images), and is part of the embedding cache key.
    """

    keys: tuple[str, ...]
    loader: Callable[[int], Image.Image]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> Image.Image:
        return self.loader(index)

    @classmethod
    def from_paths(cls, paths: Sequence[str | os.PathLike]) -> ImageSet:
        """Files on disk. They must exist (check with :func:`check_missing` first)."""
        paths = tuple(str(p) for p in paths)
        digest = hashlib.blake2b(digest_size=16)
        for p in paths:
            st = os.stat(p)
            digest.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return cls(paths, _FileLoader(paths), "files:" + digest.hexdigest())

    @classmethod
    def from_pil(cls, images: Sequence[Image.Image], ids: Iterable[object]) -> ImageSet:
        """In-memory images (e.g. from a saved Hugging Face dataset); fingerprinted by their pixels."""
        images = list(images)
        keys = tuple(str(i) for i in ids)
        if len(keys) != len(images):
            raise ValueError(f"got {len(images)} images but {len(keys)} ids")
        digest = hashlib.blake2b(digest_size=16)
        for key, im in zip(keys, images):
            digest.update(f"{key}\0{im.mode}\0{im.size}\n".encode())
            digest.update(im.tobytes())
        return cls(keys, _PILLoader(images), "pil:" + digest.hexdigest())


class _FileLoader:
    """Picklable (DataLoader workers may be spawned, not forked): a module-level class, not a closure."""

    def __init__(self, paths: tuple[str, ...]):
        self.paths = paths

    def __call__(self, i: int) -> Image.Image:
        try:
            with Image.open(self.paths[i]) as im:
                return im.convert("RGB")
        except OSError as err:  # truncated or not an image: say which file
            raise OSError(f"cannot read image {self.paths[i]}: {err}") from err


class _PILLoader:
    def __init__(self, images: list[Image.Image]):
        self.images = images

    def __call__(self, i: int) -> Image.Image:
        return self.images[i].convert("RGB")


def find_missing(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The paths that are not existing files, in order, without duplicates."""
    seen: set[str] = set()
    missing = []
    for p in paths:
        p = str(p)
        if p not in seen:
            seen.add(p)
            if not os.path.isfile(p):
                missing.append(p)
    return missing


def check_missing(paths: Sequence[str | os.PathLike], what: str, skip_missing: bool) -> set[str]:
    """Return the set of missing paths; raise :class:`MissingImagesError` if any are missing and not skipped."""
    missing = find_missing(paths)
    if missing and not skip_missing:
        raise MissingImagesError(what, missing, len(set(map(str, paths))))
    return set(missing)


def resolve_stem(folder: Path, stem: str) -> Path:
    """``folder/stem`` if it exists as given, else ``folder/stem.<ext>`` for the first image extension found.

    Returns the ``.png`` candidate when nothing exists, so a missing-image report shows a plausible path.
    """
    direct = folder / stem
    if direct.suffix.lower() in IMAGE_EXTENSIONS and direct.is_file():
        return direct
    for ext in IMAGE_EXTENSIONS:
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return direct if direct.suffix.lower() in IMAGE_EXTENSIONS else folder / f"{stem}.png"
