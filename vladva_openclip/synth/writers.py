"""File writers: training tables and webdataset shards, and evaluation sets in the real benchmarks' formats.

Formats (see the project's benchmark notes for the originals):

- training table: TSV/CSV with columns ``filepath``, ``short_caption``, ``long_caption`` (names configurable);
  ``filepath`` is relative to the table's own folder.
- webdataset shards: ``<key>.png`` (PNG bytes), ``<key>.txt`` (short caption), ``<key>.long.txt`` (long caption),
  plus ``sizes.json`` (shard basename -> sample count) that open_clip's ``get_dataset_size`` reads.
- retrieval: Karpathy ``dataset_<name>.json`` (``images[].{filepath, filename, imgid, split, sentids, sentences[].
  {tokens, raw, imgid, sentid}}``); the image of an entry is ``<json folder>/<filepath>/<filename>``.
- SugarCrepe: ``<subset>.json`` = ``{"0": {"filename", "caption", "negative_caption"}, ...}``.
- SugarCrepe++: ``<subset>.json`` = ``[{"id", "filename", "caption", "caption2", "negative_caption"}, ...]``.
- Winoground: ``examples.jsonl`` (``id, image_0, image_1, caption_0, caption_1, tag, secondary_tag,
  num_main_preds, collapsed_tag``) and ``images/<image_k>.png``.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def write_table(rows: Sequence[dict[str, str]], path: str | Path, sep: str = "\t") -> Path:
    """Write ``rows`` (dicts with the same keys) as a CSV/TSV file with a header; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows)).to_csv(path, sep=sep, index=False)
    return path


class ShardWriter:
    """Writes webdataset tar shards of at most ``shard_size`` samples, byte-identical across runs.

    Use as a context manager; :attr:`shards` lists the written paths and ``sizes.json`` is written on close.
    """

    def __init__(self, out_dir: str | Path, shard_size: int = 1000, prefix: str = "shard-"):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        if "/" in prefix or "{" in prefix:
            raise ValueError(f"shard prefix must be a plain file-name prefix, got {prefix!r}")
        self.prefix = prefix
        self.shards: list[Path] = []
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _next_shard(self):
        self._close_shard()
        path = self.out_dir / f"{self.prefix}{len(self.shards):06d}.tar"
        self.shards.append(path)
        self.sizes[path.name] = 0
        # stays open across write() calls; closed by _close_shard / close()
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._count = 0

    def _close_shard(self):
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def write(self, key: str, fields: dict[str, bytes | str]) -> None:
        """Add one sample: ``fields`` maps extension (``"png"``, ``"txt"``, ``"long.txt"``) to its content."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"webdataset keys must be non-empty with no '.' or '/', got {key!r}")
        if self._tar is None or self._count >= self.shard_size:
            self._next_shard()
        for ext, data in fields.items():
            payload = data.encode("utf-8") if isinstance(data, str) else data
            info = tarfile.TarInfo(name=f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            self._tar.addfile(info, io.BytesIO(payload))
        self._count += 1
        self.sizes[self.shards[-1].name] += 1

    def close(self) -> None:
        self._close_shard()
        (self.out_dir / "sizes.json").write_text(json.dumps(self.sizes, indent=1))

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def brace_pattern(self) -> str:
        """All shards as one brace-expandable path (what ``--train-data`` takes)."""
        if not self.shards:
            raise ValueError("no shard written")
        if len(self.shards) == 1:
            return str(self.shards[0])
        return str(self.out_dir / f"{self.prefix}{{{0:06d}..{len(self.shards) - 1:06d}}}.tar")


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def write_karpathy_json(path: str | Path, images: Sequence[tuple[str, str, Sequence[str]]],
                        dataset: str = "synth", split: str = "test") -> Path:
    """Karpathy-style retrieval file from ``(filepath, filename, captions)`` triples."""
    entries, sentid = [], 0
    for imgid, (filepath, filename, captions) in enumerate(images):
        sentences = []
        for raw in captions:
            sentences.append({"tokens": _tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        entries.append({
            "filepath": filepath, "filename": filename, "imgid": imgid, "split": split,
            "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
        })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": dataset, "images": entries}))
    return path


def write_sugarcrepe(out_dir: str | Path, subsets: dict[str, Sequence[tuple[str, str, str]]]) -> dict[str, Path]:
    """One ``<subset>.json`` per subset from ``(filename, caption, negative_caption)`` triples."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, items in subsets.items():
        data = {str(i): {"filename": f, "caption": c, "negative_caption": n} for i, (f, c, n) in enumerate(items)}
        paths[name] = out_dir / f"{name}.json"
        paths[name].write_text(json.dumps(data, indent=1))
    return paths


def write_sugarcrepe_pp(out_dir: str | Path,
                        subsets: dict[str, Sequence[tuple[str, str, str, str]]]) -> dict[str, Path]:
    """One ``<subset>.json`` per subset from ``(filename, caption, caption2, negative_caption)`` tuples."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, items in subsets.items():
        data = [{"id": i, "filename": f, "caption": c, "caption2": c2, "negative_caption": n}
                for i, (f, c, c2, n) in enumerate(items)]
        paths[name] = out_dir / f"{name}.json"
        paths[name].write_text(json.dumps(data, indent=1))
    return paths


def write_winoground_jsonl(path: str | Path, records: Sequence[dict]) -> Path:
    """Winoground's ``examples.jsonl``: one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
