"""The job folder of ``vladva caption``: files, their atomic writes, and reading them back.

::

    OUT/caption_job.json                  settings, captioner, prompts, versions, digest (written first)
    OUT/sidecars/NAME.captions.parquet    one per input shard; written last for its shard: its presence with
                                          the job's digest is what marks the shard finished
    OUT/wds/NAME.tar, OUT/wds/sizes.json  with --write-wds: the input shards plus long.txt (webdataset input)
    OUT/captions.tsv                      with --write-csv: filepath, title, long_caption, key (folder/table)
    OUT/manifest.json                     counts, skipped rows, per-shard records (rewritten at the end of a run)
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .._fs import write_atomically

__all__ = ["JOB_FILE", "MANIFEST", "SIDECAR_SCHEMA", "JobFolder", "read_sidecar", "rewrite_tar", "write_sidecar"]

JOB_FILE = "caption_job.json"
MANIFEST = "manifest.json"
META_KEY = b"vladva.caption"

SIDECAR_SCHEMA = pa.schema([
    ("key", pa.string()), ("row", pa.int64()), ("filepath", pa.string()), ("shard", pa.string()),
    ("short_caption", pa.string()), ("long_caption", pa.string()),
    ("short_source", pa.string()), ("long_source", pa.string()),
    ("model", pa.string()), ("short_prompt", pa.string()), ("long_prompt", pa.string()),
    ("settings_hash", pa.string()),
    ("short_n_tokens", pa.int64()), ("long_n_tokens", pa.int64()),
    ("short_generated_tokens", pa.int64()), ("long_generated_tokens", pa.int64()),
    ("short_finish_reason", pa.string()), ("long_finish_reason", pa.string()),
    ("short_raw", pa.string()), ("long_raw", pa.string()),
    ("short_clip_score", pa.float64()), ("long_clip_score", pa.float64()),
    ("flags", pa.list_(pa.string())),
])


def write_json(path: Path, record: Any) -> None:
    text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_sidecar(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """The shard's rows (in input order) and its record (digest, skipped rows, counts) in the file metadata."""
    columns = {f.name: [r.get(f.name) for r in rows] for f in SIDECAR_SCHEMA}
    table = pa.Table.from_pydict(columns, schema=SIDECAR_SCHEMA)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True, default=str).encode()})
    write_atomically(path, lambda tmp: pq.write_table(table, tmp))


def read_sidecar(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return table.to_pandas(), meta


def sidecar_meta(path: Path) -> dict[str, Any] | None:
    """The record of a finished sidecar, None when absent or unreadable."""
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta.get(META_KEY, b"null"))
    except (OSError, pa.ArrowInvalid, ValueError):
        return None


class JobFolder:
    def __init__(self, root: str | Path, names: list[str]):
        self.root, self.names = Path(root), names

    @property
    def job_file(self) -> Path:
        return self.root / JOB_FILE

    def sidecar(self, k: int) -> Path:
        return self.root / "sidecars" / f"{self.names[k]}.captions.parquet"

    def tar(self, k: int) -> Path:
        return self.root / "wds" / f"{self.names[k]}.tar"

    def finished(self, k: int, digest: str, inputs: str | None = None) -> dict[str, Any] | None:
        """The sidecar's record when partition ``k`` is done under this job (``digest``) and, when given, from the
        same input files (``inputs``: the source's partition fingerprint; a shard rewritten since is redone)."""
        path = self.sidecar(k)
        meta = sidecar_meta(path) if path.is_file() else None
        if meta is None or meta.get("digest") != digest:
            return None
        return meta if inputs is None or meta.get("inputs") == inputs else None

    def clean_temporaries(self) -> int:
        """Remove half-written files of a killed run (``.NAME.XXXX.tmp`` beside their targets)."""
        removed = 0
        for folder in (self.root, self.root / "sidecars", self.root / "wds"):
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed

    def data_files(self) -> list[Path]:
        return sorted([*self.root.glob("sidecars/*.captions.parquet"), *self.root.glob("wds/*.tar"),
                       *(p for p in (self.root / "captions.tsv", self.root / "wds" / "sizes.json") if p.exists())])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def rewrite_tar(src: str, dest: Path, captions: dict[str, tuple[str | None, str | None, bool]],
                long_key: str = "long.txt", short_key: str = "txt") -> int:
    """Copy ``src`` to ``dest`` (atomically), adding ``KEY.long.txt`` to every captioned sample and writing the
    short caption as ``KEY.txt`` where it was generated (an alt-text it replaces is kept as ``KEY.orig.txt``) or
    where the sample had no ``txt`` (alt-text from its json).
    ``captions``: key -> (short, long, short_generated). Members of uncaptioned (skipped) samples are copied
    unchanged; a ``long.txt`` already in the input is replaced. Returns the number of samples written."""
    def write(tmp: Path) -> int:
        count = 0
        with tarfile.open(src) as tin, tarfile.open(tmp, "w") as tout:
            group: list[tuple[tarfile.TarInfo, bytes]] = []
            key = None

            def flush() -> int:
                if key is None:
                    return 0
                short, long, short_generated = captions.get(key, (None, None, False))
                exts = {info.name[len(key) + 1:] for info, _ in group}
                # the trainer reads the short caption from txt: write it when generated, or when the alt-text
                # came from elsewhere (the json member's caption)
                write_short = short is not None and (short_generated or short_key not in exts)
                for info, data in group:
                    ext = info.name[len(key) + 1:]
                    if ext == long_key and long is not None:
                        continue
                    if ext == short_key and short_generated:
                        _add(tout, f"{key}.orig.txt", data)
                        continue
                    tout.addfile(info, io.BytesIO(data))
                if write_short:
                    _add(tout, f"{key}.{short_key}", short.encode("utf-8"))
                if long is not None:
                    _add(tout, f"{key}.{long_key}", long.encode("utf-8"))
                return 1

            for info in tin:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                member_key = info.name[:len(info.name) - len(base)] + base.split(".", 1)[0]
                if member_key != key:
                    count += flush()
                    group, key = [], member_key
                group.append((info, tin.extractfile(info).read()))
            count += flush()
        return count

    box: list[int] = []
    write_atomically(dest, lambda tmp: box.append(write(tmp)))
    return box[0]
