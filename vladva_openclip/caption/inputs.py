"""The inputs of a captioning job, on top of ``vladva embed``'s readers (:mod:`vladva_openclip.retrieval.sources`):
the same partitions (``shard_size`` rows of a folder or table, one tar of webdataset shards), the same image
decoding and bad-image handling, plus what captioning needs:

- parquet tables besides CSV/TSV, with img2dataset's column names (``url``/``filepath``/``path`` for the image,
  ``caption``/``title`` for the alt-text, ``key``);
- a stable key per row: the table's ``key`` column, else the image path (a folder: relative to the folder);
- webdataset captions from the ``txt`` member or, when there is none, the ``caption`` field of the ``json``
  member (img2dataset writes both);
- a key listing without decoding any image, for ``--verify``.
"""
from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from torch.utils.data import IterableDataset

from ..retrieval.sources import FolderSource, Source, TableSource, WebDatasetSource, _TarDataset, detect_input_format
from ..train._common import clean_caption

__all__ = ["CaptionFolder", "CaptionTable", "CaptionWebDataset", "open_caption_source", "partition_names"]

IMAGE_COLUMNS = ("filepath", "path", "image_path", "file", "image", "url")
CAPTION_COLUMNS = ("caption", "title", "text", "alt_text", "TEXT")


class CaptionFolder(FolderSource):
    def keys(self) -> list[str]:
        return [Path(p).relative_to(os.path.abspath(self.folder)).as_posix() for p in self.paths]


class CaptionTable(TableSource):
    """A CSV/TSV/parquet table: one image per row (a local path; URLs must be downloaded first)."""

    def __init__(self, path: str | os.PathLike, img_key: str | None = None, caption_key: str | None = None,
                 key_column: str | None = None, sep: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"table {self.path} does not exist")
        suffix = self.path.suffix.lower()
        self.sep = sep if sep is not None else ("\t" if suffix == ".tsv" else ",")
        if suffix == ".parquet":
            df = pd.read_parquet(self.path).astype(object).where(lambda d: d.notna(), "").astype(str)
        else:
            df = pd.read_csv(self.path, sep=self.sep, dtype=str, keep_default_na=False)
        img_key = img_key or next((c for c in IMAGE_COLUMNS if c in df.columns), None)
        if img_key is None or img_key not in df.columns:
            raise ValueError(f"{self.path}: no image column {img_key or '/'.join(IMAGE_COLUMNS)!r}; columns are "
                             f"{list(df.columns)}. Name it with --img-key")
        values = df[img_key].tolist()
        remote = [v for v in values if "://" in v and not v.startswith("file://")]
        if remote:
            raise ValueError(f"{self.path}: column {img_key!r} holds URLs (e.g. {remote[0]!r}); download the images "
                             "first (img2dataset --output_format webdataset) and caption the shards it writes")
        if caption_key is not None and caption_key not in df.columns:
            raise ValueError(f"{self.path}: no caption column {caption_key!r}; columns are {list(df.columns)}")
        caption_key = caption_key or next((c for c in CAPTION_COLUMNS if c in df.columns), None)
        if key_column is not None and key_column not in df.columns:
            raise ValueError(f"{self.path}: no key column {key_column!r}; columns are {list(df.columns)}")
        key_column = key_column or ("key" if "key" in df.columns else None)
        self.img_key, self.caption_key, self.key_column = img_key, caption_key, key_column
        captions = [clean_caption(v) for v in df[caption_key].tolist()] if caption_key else None
        self._keys = df[key_column].tolist() if key_column else list(values)
        super(TableSource, self).__init__([str(self._resolve(v.removeprefix("file://"))) for v in values], captions)

    def keys(self) -> list[str]:
        return list(self._keys)

    def describe(self) -> dict:
        return {**super().describe(), "key_column": self.key_column}


class _CaptionTar(_TarDataset):
    """The samples of one tar in order, as ``vladva embed`` reads them, the caption from ``caption_key`` or else
    the json member's ``caption`` (img2dataset writes both)."""

    def caption(self, raw: dict, key: str) -> str | None:
        return wds_caption(raw, self.caption_key)


def wds_caption(raw: dict, caption_key: str) -> str | None:
    """The alt-text of a raw webdataset sample: ``caption_key`` (e.g. ``txt``), else ``json``'s ``caption``."""
    try:
        text = clean_caption(raw.get(caption_key))
    except UnicodeDecodeError:
        text = None
    if text is None and "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError):
            return None
        value = meta.get("caption") if isinstance(meta, dict) else None
        text = clean_caption(value) if isinstance(value, str) else None
    return text


class CaptionWebDataset(WebDatasetSource):
    def dataset(self, k: int, shard_size: int, transform: Callable | None) -> IterableDataset:
        return _CaptionTar(self.urls[k], self.caption_key, self.image_keys, transform)

    def tar_keys(self, k: int) -> list[str]:
        """The sample keys of tar ``k`` in order (webdataset's rule: the member name up to its first dot)."""
        keys: list[str] = []
        with tarfile.open(self.urls[k]) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base = name.rsplit("/", 1)[-1]
                key = name[:len(name) - len(base)] + base.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
        return keys


def open_caption_source(path: str, input_format: str = "auto", *, img_key: str | None = None,
                        caption_key: str | None = None, key_column: str | None = None,
                        separator: str | None = None, wds_caption_key: str = "txt") -> Source:
    """The source for ``path``; ``auto`` decides by what it is (folder, .csv/.tsv/.parquet, .tar / braces)."""
    if input_format == "auto":
        input_format = detect_input_format(path, (".csv", ".tsv", ".parquet"))
    builders: dict[str, Callable[[], Source]] = {
        "folder": lambda: CaptionFolder(path),
        "table": lambda: CaptionTable(path, img_key, caption_key, key_column, separator),
        "webdataset": lambda: CaptionWebDataset(path, wds_caption_key),
    }
    if input_format not in builders:
        raise ValueError(f"unknown input format {input_format!r}; choose from {['auto', *builders]}")
    return builders[input_format]()


def partition_keys(source: Source, k: int, shard_size: int) -> list[str]:
    """The keys of partition ``k`` without decoding images."""
    if isinstance(source, CaptionWebDataset):
        return source.tar_keys(k)
    keys = source.keys()
    return keys[k * shard_size:(k + 1) * shard_size]


def partition_names(source: Source, shard_size: int) -> list[str]:
    """Output names of the partitions: a tar's stem (``00042``) when the stems are unique, else ``part-00042``."""
    n = source.partition_count(shard_size)
    if isinstance(source, WebDatasetSource):
        stems = [Path(u.split("::")[0]).name.split(".", 1)[0] for u in source.urls]
        if len(set(stems)) == len(stems) and all(stems):
            return stems
    return [f"part-{k:05d}" for k in range(n)]
