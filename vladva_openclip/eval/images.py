"""Image collections for evaluation: files on disk or in-memory PIL images, each with a stable fingerprint.

Reading a task's data checks only that its image files exist (:func:`check_missing`; cheap, and a run served
from the embedding cache never opens an image). A file that exists but cannot be decoded (not an image, truncated)
is found when it is embedded: :class:`~.errors.UnreadableImageError` names it, and the caller (:mod:`.api`) either
stops with a one-line error or, with ``skip_missing``, re-reads the task inside :func:`unreadable_images`, which
makes :func:`check_missing` leave those files out as it does missing ones.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..progress import progress as tqdm
from .errors import MissingImagesError, UnreadableImageError, UnreadableImagesError

__all__ = ["IMAGE_ERRORS", "IMAGE_EXTENSIONS", "ImageSet", "check_missing", "find_missing", "resolve_stem",
           "unreadable_images"]

#: file name endings accepted as images (torchvision's ImageFolder list)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: what a broken image file can raise while PIL opens and decodes it
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# unreadable files known in the current context: path -> reason (see unreadable_images)
_UNREADABLE: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("vladva_eval_unreadable",
                                                                                   default=None)


def describe_image_error(err: BaseException) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not an image file PIL can read"
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


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

    def find_unreadable(self, progress: bool = False) -> dict[str, str]:
        """Decode every image file of the set: ``{path: reason}`` of those that fail (empty for in-memory sets).
        Costs one full decoding pass; used only after an image failed, to find all bad files at once."""
        if not isinstance(self.loader, _FileLoader):
            return {}
        bad = {}
        for key in tqdm(self.keys, desc="checking images", disable=not progress, leave=False):
            try:
                with Image.open(key) as im:
                    im.load()
            except IMAGE_ERRORS as err:
                bad[key] = describe_image_error(err)
        return bad

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
        except IMAGE_ERRORS as err:  # truncated or not an image: say which file
            raise UnreadableImageError(f"cannot read image {self.paths[i]}: {describe_image_error(err)}",
                                       self.paths[i]) from err


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


@contextlib.contextmanager
def unreadable_images(known: Mapping[str, str]) -> Iterator[None]:
    """Within the block, :func:`check_missing` treats the files in ``known`` (path -> reason) as unreadable."""
    token = _UNREADABLE.set(dict(known))
    try:
        yield
    finally:
        _UNREADABLE.reset(token)


def check_missing(paths: Sequence[str | os.PathLike], what: str, skip_missing: bool) -> set[str]:
    """The set of paths to leave out: missing files, and files the current :func:`unreadable_images` context
    names. Raises :class:`MissingImagesError` / :class:`UnreadableImagesError` if there are any and
    ``skip_missing`` is off."""
    missing = find_missing(paths)
    absent = set(missing)
    known = _UNREADABLE.get() or {}
    unreadable = {p: known[p] for p in dict.fromkeys(map(str, paths)) if p in known and p not in absent}
    total = len(set(map(str, paths)))
    if not skip_missing:
        if missing:
            raise MissingImagesError(what, missing, total, unreadable)
        if unreadable:
            raise UnreadableImagesError(what, unreadable, total)
    return absent | set(unreadable)


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
