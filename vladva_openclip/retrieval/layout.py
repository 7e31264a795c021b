"""clip-retrieval's output layout, written atomically, and read back for indexing and search.

An embedding folder holds, for each output shard ``k`` of ``P`` (``k`` zero-padded to ``len(str(P))`` digits, which
is clip-retrieval's ``int(log10(P)) + 1``)::

    img_emb/img_emb_{k}.npy          [n_k, D] float16 (clip-retrieval's dtype) or float32, rows L2-normalised
    text_emb/text_emb_{k}.npy        [n_k, D] captions, same dtype and normalisation
    metadata/metadata_{k}.parquet    n_k rows: image_path (path, or webdataset key), caption, row (input row), ...

Row ``i`` of the three files is the same input item. A shard is finished when its marker
``.embed_state/shard_{k}.json`` exists; it is written last, after each data file was written to a temporary name
and renamed into place, so a killed job leaves no shard that looks finished but is not. ``manifest.json`` describes
the job. Readers need only the three folders, so a folder written by clip-retrieval itself can be indexed too; a
folder that ``vladva embed`` started (it has ``.embed_state/job.json``) is read only once its job finished (every
shard has its marker and ``manifest.json`` is there), so an interrupted job is never indexed or searched.

:func:`file_fingerprint` ties an index to the exact bytes it was built from (size, mtime and a content hash).
"""
from __future__ import annotations

import hashlib
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
    "EmbeddingFolderError",
    "OutputFolder",
    "atomic_write_bytes",
    "atomic_write_json",
    "file_digest",
    "file_fingerprint",
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
    """Standard JSON only: NaN/inf raise (``allow_nan=False``) instead of writing ``NaN`` that parsers reject."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n").encode("utf-8"))


class EmbeddingFolderError(ValueError):
    """An embedding folder cannot be read as asked (interrupted job, inconsistent shards); the message says which
    file and what to do."""


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """blake2b-128 of the file's bytes (read in 4 MiB chunks)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: Path) -> dict[str, Any]:
    """``{"size", "mtime_ns", "blake2b"}`` of a file: what an index records of every shard file it was built from."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "blake2b": file_digest(path)}


def fingerprint_differs(path: Path, recorded: dict[str, Any]) -> str | None:
    """None when ``path`` holds the bytes ``recorded`` describes, else what differs ("missing", "size", "content").

    The content hash is compared only when the size matches and the mtime does not (a copy, a touch): an unchanged
    file is not read again, and a changed one is always caught.
    """
    try:
        st = path.stat()
    except OSError:
        return "missing"
    if st.st_size != recorded.get("size"):
        return f"size {recorded.get('size')} -> {st.st_size} bytes"
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return None
    return None if file_digest(path) == recorded.get("blake2b") else "content"


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
        self.counts, dims = [], set()
        for s in self.shards:
            shape = self._shape(s.embeddings)
            self.counts.append(shape[0])
            dims.add(shape[1])
        if len(dims) > 1:
            by_dim = {}
            for s in self.shards:
                by_dim.setdefault(self._shape(s.embeddings)[1], s.embeddings)
            shown = ", ".join(f"{d} ({p})" for d, p in sorted(by_dim.items()))
            raise EmbeddingFolderError(f"{self.root}: the {folder} shards have different dimensions: {shown}; they "
                                       "come from different models. Re-embed into an empty folder with one model")
        self.dim = dims.pop()
        self._check_finished()
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._metadata: dict[int, pd.DataFrame] = {}

    @staticmethod
    def _shape(path: Path) -> tuple[int, int]:
        """``(rows, dim)`` of a shard, read from its header; anything but a 2-D float array is refused."""
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise EmbeddingFolderError(f"{path} is not a readable .npy array ({' '.join(str(err).split())}); "
                                       "re-embed this folder (vladva embed --overwrite)") from None
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
            raise EmbeddingFolderError(f"{path} holds a {array.ndim}-D {array.dtype} array of shape {array.shape}; "
                                       "embedding shards are 2-D float arrays [rows, dim]. Re-embed this folder")
        return int(array.shape[0]), int(array.shape[1])

    def _check_finished(self) -> None:
        """Refuse a folder whose ``vladva embed`` job did not finish, and shards without their metadata."""
        state = self.root / STATE_DIR
        if (state / JOB_FILE).is_file():
            if not (self.root / MANIFEST).is_file():
                raise EmbeddingFolderError(
                    f"{self.root} is an unfinished `vladva embed` job (no {MANIFEST}): rerun the same vladva embed "
                    "command to finish it, then index or search it")
            for s in self.shards:
                if not (state / f"shard_{s.name}.json").is_file():
                    raise EmbeddingFolderError(
                        f"{s.embeddings} has no shard marker ({STATE_DIR}/shard_{s.name}.json): an interrupted job "
                        "left it. Rerun the same vladva embed command to finish the folder")
        for s in self.shards:
            if s.metadata is None:
                raise EmbeddingFolderError(
                    f"{s.embeddings} has no metadata file ({META_DIR}/{META_PREFIX}{s.name}.parquet): the shard is "
                    "incomplete. Re-embed the folder (or finish the interrupted job) before indexing or searching")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def manifest(self) -> dict[str, Any] | None:
        path = self.root / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EmbeddingFolderError(f"{path} is not valid JSON ({err}); rerun vladva embed into this folder to "
                                       "rewrite it") from None
        if not isinstance(manifest, dict):
            raise EmbeddingFolderError(f"{path} is not a JSON object; rerun vladva embed into this folder")
        return manifest

    def iter_arrays(self) -> Iterator[np.ndarray]:
        """Each shard's [n_s, D] array (memory-mapped), in order."""
        for s in self.shards:
            yield np.load(s.embeddings, mmap_mode="r")

    def load(self, dtype: np.dtype = np.float32) -> np.ndarray:
        """All embeddings as one [N, D] array of ``dtype``."""
        return np.concatenate([np.asarray(a, dtype=dtype) for a in self.iter_arrays()])

    def metadata_of(self, rows: np.ndarray | list[int]) -> list[dict[str, Any]]:
        """The metadata records (column -> JSON-able value) of global rows."""
        out = []
        for row in np.asarray(rows, dtype=np.int64).reshape(-1).tolist():
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} is outside the {len(self)} embeddings of {self.root}")
            s = int(np.searchsorted(self.offsets, row, side="right") - 1)
            df = self._shard_metadata(s)
            out.append({str(k): _plain(v) for k, v in df.iloc[row - int(self.offsets[s])].items()})
        return out

    def _shard_metadata(self, s: int) -> pd.DataFrame:
        if s not in self._metadata:
            path = self.shards[s].metadata
            try:
                df = pd.read_parquet(path)
            except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a damaged file
                raise EmbeddingFolderError(f"{path} cannot be read ({type(err).__name__}: "
                                           f"{' '.join(str(err).split())[:200]}); re-embed the folder") from None
            if len(df) != self.counts[s]:
                raise EmbeddingFolderError(f"{path} has {len(df)} rows but {self.shards[s].embeddings} has "
                                           f"{self.counts[s]}; re-embed the folder")
            self._metadata[s] = df
        return self._metadata[s]

    def describe(self, fingerprints: bool = False) -> dict[str, Any]:
        """Root, kind, counts and per shard its name and count; with ``fingerprints`` also each shard file's
        :func:`file_fingerprint` (embeddings and metadata) by path relative to the root."""
        shards = []
        for s, c in zip(self.shards, self.counts):
            entry: dict[str, Any] = {"name": s.name, "count": c}
            if fingerprints:
                entry["files"] = {p.relative_to(self.root).as_posix(): file_fingerprint(p)
                                  for p in (s.embeddings, s.metadata)}
            shards.append(entry)
        return {"root": os.path.abspath(self.root), "kind": self.kind, "count": len(self), "dim": self.dim,
                "shards": shards}


def _plain(value: Any) -> Any:
    """A parquet cell as a JSON-able Python value."""
    if isinstance(value, np.generic):
        return value.item()
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value
