"""``vladva search``: text or image queries against a FAISS index or the raw embeddings; top-k with metadata.

A path holding ``{kind}.index`` + ``{kind}.index.json`` (from ``vladva index``) is searched with FAISS; an
embedding folder is searched exactly with the kernels' tiled :func:`~vladva_openclip.kernels.similarity_topk`.
Queries are embedded by the model the embeddings were made with (from the folder's ``manifest.json``) unless
another is named.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .index import import_faiss, index_paths
from .layout import EmbeddingFolder

__all__ = ["Query", "Searcher", "embed_queries", "run_search"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """``kind`` is ``text`` (``value`` the text) or ``image`` (``value`` a file path)."""

    kind: str
    value: str


class Searcher:
    """Top-k search over the ``kind`` embeddings of an index folder or an embedding folder."""

    def __init__(self, path: str | os.PathLike, kind: str = "image", *, impl: str = "auto"):
        self.path = Path(path)
        index_file, meta_file = index_paths(self.path, kind)
        self.index = None
        if meta_file.is_file():
            self.meta = json.loads(meta_file.read_text())
            self.folder = EmbeddingFolder(self.meta["embeddings"]["root"], kind)
            counts = [s["count"] for s in self.meta["embeddings"]["shards"]]
            if counts != self.folder.counts:
                raise ValueError(f"{self.folder.root} changed since {index_file} was built (shard sizes {counts} -> "
                                 f"{self.folder.counts}); rebuild the index with vladva index")
            faiss = import_faiss()
            self.index = faiss.read_index(str(index_file))
            for name, value in self.meta.get("search_params", {}).items():  # the tuned knob, as measured
                faiss.ParameterSpace().set_index_parameter(self.index, name, value)
            self.mode = f"faiss {self.meta['factory']}"
        else:
            self.meta = None
            self.folder = EmbeddingFolder(self.path, kind)
            self.gallery = torch.from_numpy(self.folder.load(np.float32))
            self.mode = "exact (similarity_topk)"
        self.kind, self.impl = kind, impl

    @property
    def manifest(self) -> dict[str, Any] | None:
        return self.folder.manifest

    def search(self, queries: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """``queries`` [Q, D] (normalised) -> per query the top-k hits ``{"rank", "score", "id", **metadata}``."""
        k = min(k, len(self.folder))
        q = queries.float().cpu()
        if self.index is not None:
            scores, ids = self.index.search(np.ascontiguousarray(q.numpy()), k)
        else:
            from ..kernels import similarity_topk

            s, i = similarity_topk(q, self.gallery, k, normalize=False, impl=self.impl)
            scores, ids = s.numpy(), i.numpy()
        out = []
        for row_scores, row_ids in zip(scores, ids):
            keep = row_ids >= 0  # FAISS pads with -1 when it finds fewer than k
            records = self.folder.metadata_of(row_ids[keep])
            out.append([{"rank": r + 1, "score": round(float(sc), 6), **rec}
                        for r, (sc, rec) in enumerate(zip(row_scores[keep], records))])
        return out


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

    Returns ``{"source", "mode", "kind", "k", "model", "queries": [{"type", "query", "results": [...]}]}``.
    """
    from ..eval.api import ModelSpec, load_model

    if not queries:
        raise ValueError("no queries: give --text and/or --image")
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
    return {"source": str(path), "mode": searcher.mode, "kind": kind, "k": k,
            "model": {"name": name, "pretrained": pretrained},
            "queries": [{"type": q.kind, "query": q.value, "results": h} for q, h in zip(queries, hits)]}
