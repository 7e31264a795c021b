"""``vladva search``: text or image queries against a FAISS index or the raw embeddings; top-k with metadata.

A path holding ``{kind}.index`` + ``{kind}.index.json`` (from ``vladva index``) is searched with FAISS; an
embedding folder is searched exactly with the kernels' tiled :func:`~vladva_openclip.kernels.similarity_topk`.
Queries are embedded by the model the embeddings were made with (from the folder's ``manifest.json``) unless
another is named.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .index import import_faiss, index_paths, manifest_identity, read_index_meta, rebuild_command
from .layout import EmbeddingFolder, fingerprint_differs

__all__ = ["Query", "Searcher", "embed_queries", "run_search"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """``kind`` is ``text`` (``value`` the text) or ``image`` (``value`` a file path)."""

    kind: str
    value: str


class Searcher:
    """Top-k search over the ``kind`` embeddings of an index folder or an embedding folder.

    An index is used only over the exact vectors it was built from: the embedding folder is looked for where the
    index recorded it relative to itself (index and embeddings moved together), then at its absolute path (the
    index moved alone); the first of these that exists must hold every shard file and the manifest's model the index
    recorded, otherwise a ValueError says what changed and how to rebuild.
    """

    def __init__(self, path: str | os.PathLike, kind: str = "image", *, impl: str = "auto"):
        self.path = Path(path)
        index_file, meta_file = index_paths(self.path, kind)
        self.index = None
        if meta_file.is_file():
            self.meta = read_index_meta(meta_file)
            self.folder = self._recorded_folder(meta_file, kind)
            faiss = import_faiss()
            try:
                self.index = faiss.read_index(str(index_file))
            except RuntimeError as err:
                raise ValueError(f"{index_file} cannot be read by FAISS ({_last_line(err)}): it is truncated or "
                                 f"corrupt; rebuild it: {self._rebuild(kind)}") from None
            if self.index.ntotal != len(self.folder) or self.index.d != self.folder.dim:
                raise ValueError(f"{index_file} holds {self.index.ntotal} x {self.index.d} vectors but "
                                 f"{self.folder.root} has {len(self.folder)} x {self.folder.dim}; rebuild it: "
                                 f"{self._rebuild(kind)}")
            for name, value in self.meta.get("search_params", {}).items():  # the tuned knob, as measured
                try:
                    faiss.ParameterSpace().set_index_parameter(self.index, name, value)
                except RuntimeError as err:
                    raise ValueError(f"{meta_file}: search parameter {name}={value!r} does not apply to "
                                     f"{index_file} ({_last_line(err)}); rebuild it: {self._rebuild(kind)}") from None
            self.blank = int(self.meta.get("blank_rows", 0) or 0)
            self.mode = f"faiss {self.meta.get('factory', type(self.index).__name__)}"
        else:
            self.meta = None
            self.folder = EmbeddingFolder(self.path, kind)
            gallery = self.folder.load(np.float32)
            finite = np.isfinite(gallery).all(axis=1)
            if not finite.all():
                row = int(np.flatnonzero(~finite)[0])
                raise ValueError(f"{self.folder.root}: {int((~finite).sum())} {kind} vectors hold NaN/inf (global "
                                 f"row {row} first); re-embed with vladva embed, which skips and counts such rows")
            self.blank = int((~gallery.any(axis=1)).sum())
            self.gallery = torch.from_numpy(gallery)
            self.mode = "exact (similarity_topk)"
        self.kind, self.impl = kind, impl

    def _rebuild(self, kind: str) -> str:
        root = (self.meta or {}).get("embeddings", {}).get("root", "EMBEDDINGS")
        return rebuild_command(root, self.path, kind, (self.meta or {}).get("index_type"))

    def _recorded_folder(self, meta_file: Path, kind: str) -> EmbeddingFolder:
        """The embedding folder the index was built from, checked file by file against the recorded fingerprints."""
        emb = self.meta["embeddings"]
        candidates = []
        if isinstance(emb.get("relative_root"), str):
            candidates.append(Path(os.path.normpath(self.path.absolute() / emb["relative_root"])))
        if Path(emb["root"]) not in candidates:
            candidates.append(Path(emb["root"]))
        existing = [c for c in candidates if c.is_dir()]
        if not existing:
            raise ValueError(f"the embeddings {meta_file} was built from are gone (looked in "
                             f"{', '.join(map(str, candidates))}); move the embedding folder back beside the index "
                             f"as it was, or rebuild: vladva index EMBEDDINGS -o {self.path} --kind {kind}")
        # the first place that holds a folder decides: an index beside an embedding folder (as it was built, or
        # moved together) never falls back to another copy elsewhere
        root = existing[0]
        problem = _differences(root, emb, kind)
        if problem is None:
            return EmbeddingFolder(root, kind)
        raise ValueError(f"{meta_file} was built from other vectors than those now in {root}: {problem}; rebuild "
                         f"the index: {rebuild_command(root, self.path, kind, self.meta.get('index_type'))}")

    @property
    def manifest(self) -> dict[str, Any] | None:
        return self.folder.manifest

    def search(self, queries: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """``queries`` [Q, D] (normalised) -> per query the top-k hits ``{"rank", "score", "id", "metadata"}``.

        ``id`` is the global row, ``metadata`` the row's metadata columns (whatever their names or types). Rows
        whose vector is all zeros (captions a row did not have) are never hits.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        want = min(k + self.blank, len(self.folder))
        q = queries.float().cpu()
        if q.ndim != 2 or q.shape[1] != self.folder.dim:
            raise ValueError(f"the queries are {tuple(q.shape)} but {self.folder.root} holds {self.folder.dim}-d "
                             "vectors: embed them with the model the folder was made with (leave --model out)")
        if self.index is not None:
            scores, ids = self.index.search(np.ascontiguousarray(q.numpy()), want)
        else:
            from ..kernels import similarity_topk

            s, i = similarity_topk(q, self.gallery, want, normalize=False, impl=self.impl)
            scores, ids = s.numpy(), i.numpy()
        out = []
        for row_scores, row_ids in zip(scores, ids):
            # FAISS pads with -1 (and a -inf / huge score) when it finds fewer than asked
            keep = (row_ids >= 0) & np.isfinite(row_scores)
            row_ids, row_scores = row_ids[keep], row_scores[keep]
            records = self.folder.metadata_of(row_ids)
            hits = []
            for sc, row, rec in zip(row_scores, row_ids.tolist(), records):
                if self.blank and self._is_blank(row):
                    continue
                hits.append({"rank": len(hits) + 1, "score": round(float(sc), 6), "id": int(row), "metadata": rec})
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def _is_blank(self, row: int) -> bool:
        if self.index is None:
            return not bool(self.gallery[row].any())
        s = int(np.searchsorted(self.folder.offsets, row, side="right") - 1)
        array = np.load(self.folder.shards[s].embeddings, mmap_mode="r")
        return not bool(np.asarray(array[row - int(self.folder.offsets[s])]).any())


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _differences(root: Path, recorded: dict[str, Any], kind: str) -> str | None:
    """None when ``root`` holds exactly the shard files and manifest model ``recorded`` describes, else what
    changed (one line)."""
    try:
        folder = EmbeddingFolder(root, kind)
    except (FileNotFoundError, ValueError) as err:
        return str(err)
    names = [s["name"] for s in recorded["shards"]]
    if [s.name for s in folder.shards] != names:
        return f"shards {names} -> {[s.name for s in folder.shards]}"
    for entry in recorded["shards"]:
        for rel, fp in entry["files"].items():
            if not isinstance(fp, dict):
                return f"no fingerprint for {rel}"
            what = fingerprint_differs(root / rel, fp)
            if what is not None:
                return f"{rel} changed ({what})"
    theirs = manifest_identity(folder.manifest)
    mine = recorded.get("manifest")
    if theirs != mine:
        fields = sorted(k for k in set(theirs or {}) | set(mine or {})
                        if (theirs or {}).get(k) != (mine or {}).get(k))
        shown = ", ".join(f"{k} {(mine or {}).get(k)!r} -> {(theirs or {}).get(k)!r}" for k in fields if k != "digest")
        return f"the manifest changed ({shown or 'job digest'})"
    return None


def embed_queries(queries: Sequence[Query], model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, *,
                  device: str | torch.device = "cpu", precision: str = "fp32") -> torch.Tensor:
    """[len(queries), D] fp32, normalised, in the order given (through the evaluator's Embedder)."""
    from ..eval.embed import EmbedConfig, Embedder
    from ..eval.images import ImageSet

    embedder = Embedder(model, preprocess, tokenizer, EmbedConfig(batch_size=32, precision=precision,
                                                                  progress=False), device=device)
    out: list[torch.Tensor | None] = [None] * len(queries)
    texts = [i for i, q in enumerate(queries) if q.kind == "text"]
    images = [i for i, q in enumerate(queries) if q.kind == "image"]
    if texts:
        for i, emb in zip(texts, embedder.texts([queries[i].value for i in texts])):
            out[i] = emb
    if images:
        missing = [queries[i].value for i in images if not os.path.isfile(queries[i].value)]
        if missing:
            raise FileNotFoundError(f"query image(s) not found: {missing}")
        for i, emb in zip(images, embedder.images(ImageSet.from_paths([queries[i].value for i in images]))):
            out[i] = emb
    return torch.stack(out)


def run_search(path: str | os.PathLike, queries: Sequence[Query], *, k: int = 10, kind: str = "image",
               model: str | None = None, pretrained: str | None = None, device: str = "cpu",
               precision: str | None = None, built: tuple | None = None) -> dict[str, Any]:
    """Search ``path`` for each query; ``built`` = ``(model, preprocess, tokenizer)`` skips building the model.

    Returns ``{"source", "mode", "kind", "k", "model", "image_roots", "queries": [{"type", "query", "results":
    [...]}]}``; ``image_roots`` are the input roots the manifest records (the only places a results page shows
    images from). Everything in it is standard JSON (no NaN/inf).
    """
    from ..eval.api import ModelSpec, load_model

    if not queries:
        raise ValueError("no queries: give --text and/or --image")
    if k < 1:
        raise ValueError(f"-k must be >= 1, got {k}")
    searcher = Searcher(path, kind)
    manifest = searcher.manifest or {}
    recorded = manifest.get("model") or {}
    name = model or recorded.get("name")
    pretrained = pretrained if model else (pretrained or recorded.get("pretrained"))
    precision = precision or manifest.get("precision") or "fp32"
    if built is None:
        if not name:
            raise ValueError(f"{searcher.folder.root} has no manifest naming its model: give --model (and "
                             "--pretrained) to embed the queries with")
        built = load_model(ModelSpec(name, pretrained), device=device, precision=precision)
    emb = embed_queries(queries, *built, device=device, precision=precision)
    hits = searcher.search(emb, k)
    roots = manifest.get("image_roots")
    return {"source": str(path), "mode": searcher.mode, "kind": kind, "k": k,
            "model": {"name": name, "pretrained": pretrained},
            "image_roots": [str(r) for r in roots] if isinstance(roots, list) else [],
            "queries": [{"type": q.kind, "query": q.value, "results": h} for q, h in zip(queries, hits)]}
