"""Inputs of an embedding job, cut into partitions (one output shard each) that do not depend on the world size.

- an image folder: every image file below it, sorted by relative path; a ``.txt`` file with the same stem holds
  the caption (clip-retrieval's convention). Partition ``k`` holds rows ``[k * shard_size, (k + 1) * shard_size)``.
- a CSV/TSV table: one row per image (``--csv-img-key``, default ``filepath``) with an optional caption column
  (``--csv-caption-key``; by default ``title``, open_clip's name, or ``caption`` if present); relative paths resolve against the table's folder first, then the
  working directory (the training reader's convention). Partitions as for a folder.
- webdataset shards (``.tar``, brace expansion, ``::`` between lists): partition ``k`` is the ``k``-th tar, rows are
  the samples' positions in it.

Image decoding is the training readers' (:func:`~vladva_openclip.train._common.load_rgb`): a missing, truncated or
corrupt image raises one of ``IMAGE_ERRORS``, which the job turns into a skipped row.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..eval.images import IMAGE_EXTENSIONS
from ..train._common import IMAGE_ERRORS, clean_caption, load_rgb
from ..train._wds import IMAGE_KEYS

__all__ = ["FolderSource", "Sample", "Source", "TableSource", "WebDatasetSource", "open_source"]

_logger = logging.getLogger(__name__)

#: caption columns of a table looked for when none is named
DEFAULT_CAPTION_KEYS = ("title", "caption")


@dataclass
class Sample:
    """One input row after decoding: ``pixels`` is ``preprocess(image)`` ([3, H, W]) or None when images are off or
    the image failed (``error`` then says why)."""

    row: int
    key: str
    caption: str | None
    pixels: torch.Tensor | None = None
    error: str | None = None
    shard: str | None = None  # the tar a webdataset sample came from


def _decode(sample: Sample, source: str | bytes | None, transform: Callable | None) -> Sample:
    if transform is None:
        return sample
    if source is None:
        sample.error = "no image in the sample"
        return sample
    try:
        sample.pixels = transform(load_rgb(source))
    except IMAGE_ERRORS as err:
        sample.error = f"{type(err).__name__}: {err}"
    return sample


class Source(ABC):
    """An input collection. ``describe()`` goes into the manifest and the job's fingerprint."""

    kind: str = ""

    @abstractmethod
    def partition_count(self, shard_size: int) -> int: ...

    @abstractmethod
    def partition_size(self, k: int, shard_size: int) -> int | None:
        """Rows of partition ``k`` (None when not known before reading it)."""

    @abstractmethod
    def dataset(self, k: int, shard_size: int, transform: Callable | None) -> Dataset | IterableDataset:
        """The rows of partition ``k`` as :class:`Sample` objects, decoded with ``transform`` (None: no images)."""

    @abstractmethod
    def has_captions(self) -> bool: ...

    @abstractmethod
    def describe(self) -> dict: ...

    @abstractmethod
    def partition_fingerprint(self, k: int, shard_size: int) -> str:
        """A hash of partition ``k``'s inputs (names, sizes, mtimes, captions): a finished shard is reused only
        while this is unchanged."""

    @abstractmethod
    def image_roots(self) -> list[str]:
        """Absolute folders (or tar files) the images come from: the only places a results page shows images from."""

    def caption_errors(self) -> list[dict[str, str]]:
        """Caption files that could not be read (``{"path", "reason"}``); their rows count as caption-less."""
        return []


def _stat_key(path: str) -> list:
    """``[path, size, mtime_ns]`` (size and mtime None when the file is missing)."""
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]


def _hash(obj: object) -> str:
    return hashlib.blake2b(json.dumps(obj, ensure_ascii=False).encode("utf-8"), digest_size=16).hexdigest()


class _RowList(Source):
    """A source whose rows are known up front: ``paths[i]`` and ``captions[i]`` (None: no caption)."""

    def __init__(self, paths: list[str], captions: list[str | None] | None):
        if not paths:
            raise ValueError(f"{self.describe()['path']}: no images found")
        self.paths, self.captions = paths, captions

    def __len__(self) -> int:
        return len(self.paths)

    def partition_count(self, shard_size: int) -> int:
        return -(-len(self.paths) // shard_size)

    def partition_size(self, k: int, shard_size: int) -> int:
        return len(range(k * shard_size, min((k + 1) * shard_size, len(self.paths))))

    def dataset(self, k: int, shard_size: int, transform: Callable | None) -> Dataset:
        return _RowDataset(self, range(k * shard_size, min((k + 1) * shard_size, len(self.paths))), transform)

    def has_captions(self) -> bool:
        return self.captions is not None and any(c is not None for c in self.captions)

    def missing_captions(self) -> int:
        return len(self.paths) if self.captions is None else sum(c is None for c in self.captions)

    def partition_fingerprint(self, k: int, shard_size: int) -> str:
        rows = range(k * shard_size, min((k + 1) * shard_size, len(self.paths)))
        return _hash([[*_stat_key(self.paths[r]), self.captions[r] if self.captions is not None else None]
                      for r in rows])


class _RowDataset(Dataset):
    def __init__(self, source: _RowList, rows: range, transform: Callable | None):
        self.source, self.rows, self.transform = source, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        row = self.rows[i]
        path = self.source.paths[row]
        caption = self.source.captions[row] if self.source.captions is not None else None
        return _decode(Sample(row, path, caption), path, self.transform)


class FolderSource(_RowList):
    kind = "folder"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder {self.folder} does not exist")
        files = sorted((p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                       key=lambda p: p.relative_to(self.folder).as_posix())
        captions = []
        self._caption_errors: list[dict[str, str]] = []
        for p in files:
            txt = p.with_suffix(".txt")
            captions.append(self._read_caption(txt) if txt.is_file() else None)
        if self._caption_errors:
            _logger.warning("%d caption files cannot be read, e.g. %s (%s); their images are embedded without a "
                            "caption (listed in the manifest's caption_errors)", len(self._caption_errors),
                            self._caption_errors[0]["path"], self._caption_errors[0]["reason"])
        super().__init__([os.path.abspath(p) for p in files], captions)

    def _read_caption(self, txt: Path) -> str | None:
        """The caption in ``txt``, or None (recorded in caption_errors) when it is not UTF-8 text or unreadable;
        one bad file does not stop the job, as the trainer skips such samples."""
        try:
            return clean_caption(txt.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, OSError) as err:
            reason = (f"not UTF-8 text (byte {err.start})" if isinstance(err, UnicodeDecodeError)
                      else f"{type(err).__name__}: {err.strerror or err}")
            self._caption_errors.append({"path": os.path.abspath(txt), "reason": reason})
            return None

    def caption_errors(self) -> list[dict[str, str]]:
        return list(self._caption_errors)

    def image_roots(self) -> list[str]:
        return [os.path.abspath(self.folder)]

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.path.abspath(self.folder), "rows": len(getattr(self, "paths", []))}


class TableSource(_RowList):
    kind = "table"

    def __init__(self, path: str | os.PathLike, img_key: str = "filepath", caption_key: str | None = None,
                 sep: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"table {self.path} does not exist")
        self.sep = sep if sep is not None else ("\t" if self.path.suffix.lower() == ".tsv" else ",")
        # all text; only empty cells are missing (a caption "NA" stays a caption), as the training reader reads it
        df = pd.read_csv(self.path, sep=self.sep, dtype=str, keep_default_na=False)
        if img_key not in df.columns:
            raise ValueError(f"{self.path}: no image column {img_key!r}; columns are {list(df.columns)} (read with "
                             f"separator {self.sep!r}). Name it with --csv-img-key, the separator with --csv-separator")
        self.img_key, self.caption_key = img_key, caption_key
        if caption_key is None:  # not named: open_clip's default column, or a "caption" column, if there is one
            caption_key = next((k for k in DEFAULT_CAPTION_KEYS if k in df.columns), None)
        elif caption_key not in df.columns:
            raise ValueError(f"{self.path}: no caption column {caption_key!r}; columns are {list(df.columns)}")
        captions = [clean_caption(v) for v in df[caption_key].tolist()] if caption_key else None
        super().__init__([str(self._resolve(p)) for p in df[img_key].tolist()], captions)

    def _resolve(self, value: str) -> Path:
        """Relative paths: the table's folder first, then the working directory (as the training reader does)."""
        p = Path(value)
        if p.is_absolute():
            return p
        local = self.path.parent / p
        return (local if local.exists() or not p.exists() else p).absolute()

    def image_roots(self) -> list[str]:
        """The deepest folder holding every image the table names (what was read, and nothing above it)."""
        folders = {os.path.dirname(os.path.abspath(p)) for p in self.paths}
        return [os.path.commonpath(sorted(folders))] if folders else []

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.path.abspath(self.path), "img_key": self.img_key,
                "caption_key": self.caption_key, "rows": len(getattr(self, "paths", []))}


class WebDatasetSource(Source):
    kind = "webdataset"

    def __init__(self, urls: str, caption_key: str = "txt", image_keys: tuple[str, ...] = IMAGE_KEYS):
        from open_clip_train.data import expand_urls

        self.spec = urls
        self.urls, _ = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no webdataset shards in {urls!r}")
        # local shards are stored absolute, so their thumbnails are found from any working directory
        self.urls = [u if "://" in u or u.startswith("pipe:") else os.path.abspath(u) for u in self.urls]
        missing = [u for u in self.urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} webdataset shard(s) not found, e.g. {missing[:3]}")
        self.caption_key, self.image_keys = caption_key, tuple(image_keys)
        self._has_captions: bool | None = None

    def partition_count(self, shard_size: int) -> int:
        return len(self.urls)

    def partition_size(self, k: int, shard_size: int) -> None:
        return None

    def dataset(self, k: int, shard_size: int, transform: Callable | None) -> IterableDataset:
        return _TarDataset(self.urls[k], self.caption_key, self.image_keys, transform)

    def partition_fingerprint(self, k: int, shard_size: int) -> str:
        return _hash(_stat_key(self.urls[k]))

    def image_roots(self) -> list[str]:
        """The deepest folder holding every local tar (one entry, however many tars)."""
        folders = {os.path.dirname(u) for u in self.urls if "://" not in u and not u.startswith("pipe:")}
        return [os.path.commonpath(sorted(folders))] if folders else []

    def has_captions(self) -> bool:
        """Whether the first sample of the first shard has a caption (the same answer on every rank)."""
        if self._has_captions is None:
            first = next(iter(_raw_samples(self.urls[0])), {})
            self._has_captions = self.caption_key in first
        return self._has_captions

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.spec, "shards": len(self.urls), "caption_key": self.caption_key}


def _raw_samples(url: str, on_error: Callable[[BaseException], None] | None = None) -> Iterator[dict]:
    from open_clip_train.data import tarfile_to_samples_nothrow

    def handler(err: BaseException) -> bool:
        if on_error is not None:
            on_error(err)
        return True

    return iter(tarfile_to_samples_nothrow([{"url": url}], handler=handler))


class _TarDataset(IterableDataset):
    """The samples of one tar in order; with DataLoader workers, worker ``w`` of ``W`` decodes rows ``w, w+W, ...``
    (each worker reads the stream; decoding, the costly part, is split)."""

    def __init__(self, url: str, caption_key: str, image_keys: tuple[str, ...], transform: Callable | None):
        self.url, self.caption_key, self.image_keys, self.transform = url, caption_key, image_keys, transform

    def caption(self, raw: dict, key: str) -> str | None:
        """The sample's caption from ``caption_key``; one that is not UTF-8 is logged and the image kept without it."""
        try:
            return clean_caption(raw.get(self.caption_key))
        except UnicodeDecodeError as err:  # the image is still embedded, without a caption
            _logger.warning("%s: the caption of sample %s is not UTF-8 text (byte %d); embedded without one",
                            self.url, key, err.start)
            return None

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        errors: list[BaseException] = []
        row = -1
        for row, raw in enumerate(_raw_samples(self.url, errors.append)):
            if row % workers != worker:
                continue
            img_key = next((k for k in self.image_keys if k in raw), None)
            key = str(raw.get("__key__", row))
            sample = Sample(row, key, self.caption(raw, key), shard=self.url)
            yield _decode(sample, raw.get(img_key) if img_key else None, self.transform)
        if errors and worker == 0:  # a broken stream ends the tar early: one record for the rest of it
            yield Sample(row + 1, f"{self.url}:<after row {row}>", None, shard=self.url,
                         error=f"tar stream error: {type(errors[0]).__name__}: {errors[0]}")


def detect_input_format(path: str, table_suffixes: tuple[str, ...]) -> str:
    """``folder``, ``table`` (a file ending in one of ``table_suffixes``) or ``webdataset`` (.tar or a brace
    pattern), by what ``path`` is; anything else is a one-line error naming the choices."""
    first = str(path).split("::")[0].lower()
    if os.path.isdir(path):
        return "folder"
    if first.endswith(table_suffixes):
        return "table"
    if ".tar" in first or "{" in first:
        return "webdataset"
    tables = "/".join(table_suffixes)
    raise ValueError(f"cannot tell what {path!r} is: give an image folder, a {tables} table or .tar "
                     "webdataset shards, or say which with --input-format folder|table|webdataset")


def open_source(path: str, input_format: str = "auto", *, csv_img_key: str = "filepath",
                csv_caption_key: str | None = None, csv_separator: str | None = None,
                wds_caption_key: str = "txt") -> Source:
    """The :class:`Source` for ``path``; ``input_format`` ``auto`` decides by what ``path`` is."""
    if input_format == "auto":
        input_format = detect_input_format(path, (".csv", ".tsv"))
    builders: dict[str, Callable[[], Source]] = {
        "folder": lambda: FolderSource(path),
        "table": lambda: TableSource(path, csv_img_key, csv_caption_key, csv_separator),
        "webdataset": lambda: WebDatasetSource(path, wds_caption_key),
    }
    if input_format not in builders:
        raise ValueError(f"unknown input format {input_format!r}; choose from {['auto', *builders]}")
    return builders[input_format]()
