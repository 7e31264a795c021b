"""clip-retrieval's output layout, written atomically, and read back for indexing and search.

An embedding folder holds, for each output shard ``k`` of ``P`` (``k`` zero-padded to ``len(str(P))`` digits, which
is clip-retrieval's ``int(log10(P)) + 1``)::

    img_emb/img_emb_{k}.npy          [n_k, D] float16 (clip-retrieval's dtype) or float32, rows L2-normalised
    text_emb/text_emb_{k}.npy        [n_k, D] captions, same dtype and normalisation
    metadata/metadata_{k}.parquet    n_k rows: image_path (path, or webdataset key), caption, row (input row), ...

Row ``i`` of the three files is the same input item. A shard is finished when its marker
``.embed_state/shard_{k}.json`` exists; it is written last, after each data file was written to a temporary name
and renamed into place, so a killed job leaves no shard that looks finished but is not. ``manifest.json`` describes
the job. Readers need only the three folders, so a folder written by clip-retrieval itself can be indexed too.
"""
from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._fs import make_temp_file

__all__ = [
    "KINDS",
    "MANIFEST",
    "EmbeddingFolder",
    "OutputFolder",
    "atomic_write_bytes",
    "atomic_write_json",
    "shard_name",
]

#: embedding kind -> (folder, file prefix)
KINDS = {"image": ("img_emb", "img_emb_"), "text": ("text_emb", "text_emb_")}
META_DIR, META_PREFIX = "metadata", "metadata_"
STATE_DIR = ".embed_state"
MANIFEST = "manifest.json"
JOB_FILE = "job.json"


def shard_name(k: int, partition_count: int) -> str:
    """clip-retrieval's shard suffix: ``k`` zero-padded to the number of digits of ``partition_count``."""
    return str(k).zfill(len(str(partition_count)))


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync it, and rename it over ``path``.

    The temporary file gets the umask's permissions (``make_temp_file``; mkstemp's 0600 would stay on the shard).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))


def _npy_bytes(array: np.ndarray) -> memoryview:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getbuffer()


def _parquet_bytes(df: pd.DataFrame) -> memoryview:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getbuffer()


class OutputFolder:
    """The writer side: shard files, shard markers, the job file and the manifest of one embedding folder."""

    def __init__(self, root: str | os.PathLike, partition_count: int):
        self.root = Path(root)
        self.partition_count = partition_count

    def path(self, kind: str, k: int) -> Path:
        name = shard_name(k, self.partition_count)
        if kind == "metadata":
            return self.root / META_DIR / f"{META_PREFIX}{name}.parquet"
        folder, prefix = KINDS[kind]
        return self.root / folder / f"{prefix}{name}.npy"

    def marker(self, k: int) -> Path:
        return self.root / STATE_DIR / f"shard_{shard_name(k, self.partition_count)}.json"

    @property
    def job_file(self) -> Path:
        return self.root / STATE_DIR / JOB_FILE

    def finished(self, k: int) -> dict[str, Any] | None:
        """The marker record of shard ``k`` if it is finished (its marker and every file it lists exist)."""
        try:
            record = json.loads(self.marker(k).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not all((self.root / f).is_file() for f in record.get("files", [])):
            return None
        return record

    def write_shard(self, k: int, arrays: dict[str, np.ndarray], metadata: pd.DataFrame,
                    record: dict[str, Any]) -> dict[str, Any]:
        """Write shard ``k`` (``arrays``: kind -> [n, D]; nothing but the marker when n == 0), marker last."""
        n = len(metadata)
        for kind, array in arrays.items():
            if array.shape[0] != n:
                raise ValueError(f"shard {k}: {kind} has {array.shape[0]} rows, metadata {n}")
        files = []
        if n:
            for kind, array in arrays.items():
                atomic_write_bytes(self.path(kind, k), _npy_bytes(array))
                files.append(self.path(kind, k))
            atomic_write_bytes(self.path("metadata", k), _parquet_bytes(metadata))
            files.append(self.path("metadata", k))
        record = {**record, "shard": k, "count": n, "files": [f.relative_to(self.root).as_posix() for f in files]}
        atomic_write_json(self.marker(k), record)
        return record

    def shard_files(self) -> list[Path]:
        """Every embedding and metadata file in the folder (of any job)."""
        files = []
        for folder, prefix in (*KINDS.values(), (META_DIR, META_PREFIX)):
            if (self.root / folder).is_dir():
                files += sorted((self.root / folder).glob(f"{prefix}*"))
        return files

    def clean_temporaries(self) -> int:
        """Remove temporary files a killed job left behind; returns how many."""
        removed = 0
        for folder in (*(f for f, _ in KINDS.values()), META_DIR, STATE_DIR, "."):
            d = self.root / folder
            if d.is_dir():
                for tmp in d.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
                    removed += 1
        return removed


@dataclass(frozen=True)
class _Shard:
    name: str           # the zero-padded suffix
    embeddings: Path
    metadata: Path | None


class EmbeddingFolder:
    """The reader side: the shards of one kind, in shard order, as one [N, D] matrix plus per-row metadata.

    Global row ``i`` is row ``i - offset[s]`` of shard ``s``; the order is the shards' numeric order.
    """

    def __init__(self, root: str | os.PathLike, kind: str = "image"):
        if kind not in KINDS:
            raise ValueError(f"unknown embedding kind {kind!r}; choose from {sorted(KINDS)}")
        self.root, self.kind = Path(root), kind
        folder, prefix = KINDS[kind]
        pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.npy$")
        found = []
        for p in (self.root / folder).glob(f"{prefix}*.npy") if (self.root / folder).is_dir() else []:
            m = pattern.match(p.name)
            if m:
                meta = self.root / META_DIR / f"{META_PREFIX}{m.group(1)}.parquet"
                found.append((int(m.group(1)), _Shard(m.group(1), p, meta if meta.is_file() else None)))
        if not found:
            raise FileNotFoundError(f"{self.root} holds no {folder}/{prefix}*.npy files: is it the output folder of "
                                    f"`vladva embed` (or clip-retrieval inference) with {kind} embeddings?")
        self.shards = [s for _, s in sorted(found, key=lambda t: t[0])]
        self.counts = [int(np.load(s.embeddings, mmap_mode="r").shape[0]) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._metadata: dict[int, pd.DataFrame] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def manifest(self) -> dict[str, Any] | None:
        path = self.root / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None

    def iter_arrays(self) -> Iterator[np.ndarray]:
        """Each shard's [n_s, D] array (memory-mapped), in order."""
        for s in self.shards:
            yield np.load(s.embeddings, mmap_mode="r")

    def load(self, dtype: np.dtype = np.float32) -> np.ndarray:
        """All embeddings as one [N, D] array of ``dtype``."""
        return np.concatenate([np.asarray(a, dtype=dtype) for a in self.iter_arrays()])

    def metadata_of(self, rows: np.ndarray | list[int]) -> list[dict[str, Any]]:
        """The metadata records of global rows (``{"id": row}`` alone for a shard without metadata)."""
        out = []
        for row in np.asarray(rows, dtype=np.int64).reshape(-1).tolist():
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} is outside the {len(self)} embeddings of {self.root}")
            s = int(np.searchsorted(self.offsets, row, side="right") - 1)
            df = self._shard_metadata(s)
            record = {"id": row}
            if df is not None:
                record.update({k: _plain(v) for k, v in df.iloc[row - int(self.offsets[s])].items()})
            out.append(record)
        return out

    def _shard_metadata(self, s: int) -> pd.DataFrame | None:
        if s not in self._metadata:
            path = self.shards[s].metadata
            df = pd.read_parquet(path) if path is not None else None
            if df is not None and len(df) != self.counts[s]:
                raise ValueError(f"{path} has {len(df)} rows but {self.shards[s].embeddings} has {self.counts[s]}")
            self._metadata[s] = df
        return self._metadata[s]

    def describe(self) -> dict[str, Any]:
        return {"root": os.path.abspath(self.root), "kind": self.kind, "count": len(self),
                "shards": [{"name": s.name, "count": c} for s, c in zip(self.shards, self.counts)]}


def _plain(value: Any) -> Any:
    """A parquet cell as a JSON-able Python value."""
    if isinstance(value, np.generic):
        return value.item()
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value
