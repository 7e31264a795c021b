"""``vladva index``: a FAISS index over an embedding folder, chosen by size as autofaiss chooses.

- at most ``flat_threshold`` vectors (and within the memory budget): ``IndexFlatIP``, exact;
- above it, HNSW (``HNSW{M},Flat``) while the full-precision vectors and the graph fit ``max_memory``;
- otherwise IVF-PQ (``IVF{nlist},PQ{m}``) with ``nlist`` near ``4 * sqrt(N)`` and a code size that fits the budget;
  when 8-bit scalar-quantised copies of the vectors (D bytes each) fit as well, the PQ candidates (``k_factor``
  times k) are re-ranked with them (``,Refine(SQ8)``): PQ codes alone cap recall@10 well below 1 (about 0.6 for
  64-byte codes of 256-d vectors in BENCHMARKS.md), the re-ranking brings it back near exact.

The search-time knob (``nprobe`` / ``efSearch``) is tuned to the smallest value reaching ``target_recall``
recall@k on held-out database vectors, and the recall on another disjoint sample is written down as the index's
expected recall (the queries are database vectors, as autofaiss measures it; cross-modal queries can differ).
Everything chosen and measured goes into ``{kind}.index.json`` next to ``{kind}.index``.

Vectors are read shard by shard; exact neighbours for the recall estimate are merged across shards, so nothing
needs the whole [N, D] matrix at once except the flat and HNSW indexes themselves.

The index is tied to the exact vectors it was built from: ``{kind}.index.json`` records every shard file's size,
mtime and content hash, the embedding manifest's model (name, pretrained tag, weights fingerprint, job digest), and
where the embedding folder is both relative to the index folder and absolute. ``vladva search`` checks all of it
(:mod:`.search`). NaN/inf vectors are refused here (a shard holding one names its file and row); all-zero vectors
(caption-less rows of text embeddings) are counted as ``blank_rows`` so search can leave them out.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .layout import EmbeddingFolder, EmbeddingFolderError, atomic_write_bytes, atomic_write_json

__all__ = ["INDEX_TYPES", "IndexConfig", "IndexPlan", "build_index", "choose_index", "import_faiss",
           "index_paths", "manifest_identity", "parse_bytes", "rebuild_command", "recall_at_k"]

_logger = logging.getLogger(__name__)

INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("vladva index needs FAISS: pip install 'vladva_openclip[index]' (faiss-cpu), or faiss-gpu "
                          "where it is available") from None
    return faiss


def parse_bytes(value: int | str) -> int:
    """``"16G"``, ``"512M"``, ``"1.5GB"`` or a number of bytes -> bytes."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)i?B?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {value!r} as a size: write e.g. 16G, 512M or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class IndexConfig:
    """index_type: auto (by size, see the module doc), flat, hnsw or ivfpq; flat_threshold: largest N kept exact;
    max_memory: budget for the index (bytes or "16G"); target_recall: recall@k the search knob is tuned to;
    n_queries: database vectors used to tune and, separately, to estimate recall; k: the k of recall@k."""

    index_type: str = "auto"
    flat_threshold: int = 100_000
    max_memory: int | str = "16G"
    target_recall: float = 0.95
    hnsw_m: int = 32
    ivf_nlist: int | None = None
    pq_m: int | None = None
    refine: bool | None = None
    k_factor: int = 8
    train_size: int | None = None
    n_queries: int = 500
    k: int = 10
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index type {self.index_type!r}: choose from {INDEX_TYPES}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        for name in ("flat_threshold", "hnsw_m", "k_factor", "n_queries", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ivf_nlist", "pq_m", "train_size", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        parse_bytes(self.max_memory)


@dataclass
class IndexPlan:
    """What to build: ``factory`` is the faiss.index_factory string; ``memory_bytes`` the estimate."""

    index_type: str
    factory: str
    memory_bytes: int
    reason: str
    params: dict[str, Any] = field(default_factory=dict)


def _hnsw_bytes(n: int, d: int, m: int) -> int:
    # vectors + about 2*M neighbour ids (int32) per vector on level 0, plus the upper levels (~1/M of that)
    return int(n * (4 * d + 4 * 2 * m * (1 + 1 / m)))


def _ivf_nlist(n: int) -> int:
    """A power of two near 4 * sqrt(N), with at least 39 training points per centroid (faiss's minimum)."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return int(max(1, min(nlist, n // 39, 1 << 18)))


def _pq_m(d: int, budget_per_vector: float) -> int:
    """The largest divisor of D that is at most the byte budget per vector, 64 and D / 2 (8-bit codes: m bytes a
    vector; one-dimensional sub-vectors train very slowly in faiss)."""
    limit = int(max(1, min(64, budget_per_vector, max(1, d // 2))))
    return max(m for m in range(1, limit + 1) if d % m == 0)


def choose_index(n: int, d: int, config: IndexConfig) -> IndexPlan:
    """The index for N vectors of dimension D under ``config`` (see the module docstring)."""
    budget = parse_bytes(config.max_memory)
    flat = n * d * 4
    kind = config.index_type
    reason = f"asked for {kind}"
    if kind == "auto":
        if n <= config.flat_threshold and flat <= budget:
            kind, reason = "flat", f"N={n} <= flat_threshold={config.flat_threshold}: exact search"
        elif _hnsw_bytes(n, d, config.hnsw_m) <= budget:
            kind, reason = "hnsw", (f"N={n} > flat_threshold={config.flat_threshold} and the full-precision vectors "
                                    f"plus the graph ({_hnsw_bytes(n, d, config.hnsw_m) / 2**20:.0f} MiB) fit "
                                    f"max_memory ({budget / 2**20:.0f} MiB)")
        else:
            kind, reason = "ivfpq", (f"N={n}: full-precision vectors ({flat / 2**20:.0f} MiB) do not fit max_memory "
                                     f"({budget / 2**20:.0f} MiB); compressed codes")
    if kind == "flat":
        return IndexPlan("flat", "Flat", flat, reason)
    if kind == "hnsw":
        return IndexPlan("hnsw", f"HNSW{config.hnsw_m},Flat", _hnsw_bytes(n, d, config.hnsw_m), reason,
                         {"M": config.hnsw_m})
    nlist = config.ivf_nlist or _ivf_nlist(n)
    per_vector = (budget - nlist * d * 4) / max(n, 1) - 8  # codes + 8-byte ids, after the coarse centroids
    m = config.pq_m or _pq_m(d, per_vector)
    if d % m:
        raise ValueError(f"pq_m={m} must divide the dimension {d}")
    memory = nlist * d * 4 + n * (m + 8) + 256 * d * 4
    params = {"nlist": nlist, "pq_m": m, "pq_bits": 8}
    refine = config.refine if config.refine is not None else memory + n * d <= budget
    if not refine:
        return IndexPlan("ivfpq", f"IVF{nlist},PQ{m}", memory, reason, params)
    return IndexPlan("ivfpq", f"IVF{nlist},PQ{m},Refine(SQ8)", memory + n * d, reason + "; SQ8 re-ranking fits too",
                     {**params, "refine": "SQ8", "k_factor": config.k_factor})


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ exact_i| / k; ``found`` and ``exact`` are [Q, k] ids (-1: none)."""
    k = exact.shape[1]
    hits = [len(set(f[f >= 0].tolist()) & set(e.tolist())) for f, e in zip(found, exact)]
    return float(np.mean(hits) / k) if hits else float("nan")


def _exact_topk(folder: EmbeddingFolder, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k ids [Q, k] over all shards, merged shard by shard."""
    faiss = import_faiss()
    best_d = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for offset, array in zip(folder.offsets, folder.iter_arrays()):
        xb = np.ascontiguousarray(array, dtype=np.float32)
        dist, ids = faiss.knn(queries, xb, min(k, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
        best_d = np.concatenate([best_d, dist], axis=1)
        best_i = np.concatenate([best_i, ids + offset], axis=1)
        # stable on (-score, id): equal scores keep the lower id, as the kernels' top-k does
        order = np.lexsort((best_i, -best_d), axis=1)[:, :k]
        best_d = np.take_along_axis(best_d, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
    return best_i


def _rows(folder: EmbeddingFolder, ids: np.ndarray) -> np.ndarray:
    """The vectors of global rows ``ids`` (any order) as float32 [len(ids), D]."""
    out = None
    arrays = list(folder.iter_arrays())
    for j, row in enumerate(ids.tolist()):
        s = int(np.searchsorted(folder.offsets, row, side="right") - 1)
        vec = np.asarray(arrays[s][row - int(folder.offsets[s])], dtype=np.float32)
        if out is None:
            out = np.empty((len(ids), vec.shape[0]), dtype=np.float32)
        out[j] = vec
    return out


def _knob(plan: IndexPlan) -> tuple[str | None, list[int]]:
    if plan.index_type == "hnsw":
        return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024]
    if plan.index_type == "ivfpq":
        nlist = plan.params["nlist"]
        return "nprobe", sorted({min(nlist, 2 ** i) for i in range(int(math.log2(nlist)) + 1)} | {nlist})
    return None, []


def _set_knob(index, name: str, value: int) -> None:
    faiss = import_faiss()
    faiss.ParameterSpace().set_index_parameter(index, name, value)


#: the fewest training vectors of 8-bit PQ codes: one per centroid of each sub-quantizer (faiss refuses fewer)
PQ_MIN_TRAIN = 256


def manifest_identity(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """What an index records of the embedding manifest: the model (name, pretrained, weights fingerprint) and the
    job digest. None for a folder without a manifest (clip-retrieval's own)."""
    if manifest is None:
        return None
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    return {"model": model.get("name"), "pretrained": model.get("pretrained"),
            "weights_fingerprint": model.get("weights_fingerprint"), "digest": manifest.get("digest")}


def rebuild_command(embeddings: str | os.PathLike, out_dir: str | os.PathLike, kind: str,
                    index_type: str | None = None) -> str:
    """The ``vladva index`` command line that rebuilds an index."""
    extra = f" --index-type {index_type}" if index_type and index_type != "auto" else ""
    return f"vladva index {embeddings} -o {out_dir} --kind {kind}{extra}"


def _scan(folder: EmbeddingFolder) -> int:
    """Refuse NaN/inf vectors (naming the first shard file and row); return the number of all-zero rows."""
    bad, blank = [], 0
    for s, array in zip(folder.shards, folder.iter_arrays()):
        x = np.asarray(array, dtype=np.float32)
        finite = np.isfinite(x).all(axis=1)
        bad += [(s.embeddings, int(r)) for r in np.flatnonzero(~finite)]
        blank += int((finite & ~x.any(axis=1)).sum())
    if bad:
        path, row = bad[0]
        raise EmbeddingFolderError(f"{path} row {row}" + (f" and {len(bad) - 1} more rows" if len(bad) > 1 else "")
                                   + " hold NaN/inf values: an index cannot rank them. Re-embed with vladva embed "
                                   "(it skips and counts such rows) or remove those rows")
    return blank


def index_paths(out_dir: str | os.PathLike, kind: str) -> tuple[Path, Path]:
    """``(index file, its metadata JSON)`` for ``kind`` embeddings in ``out_dir``."""
    out = Path(out_dir)
    return out / f"{kind}.index", out / f"{kind}.index.json"


def build_index(embeddings: str | os.PathLike, out_dir: str | os.PathLike, kind: str = "image",
                config: IndexConfig | None = None) -> dict[str, Any]:
    """Build, tune and write the index of ``embeddings``' ``kind`` vectors; returns its metadata."""
    faiss = import_faiss()
    config = config or IndexConfig()
    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"index folder {out} is a file: give a folder (new or existing) to -o")
    folder = EmbeddingFolder(embeddings, kind)
    manifest = folder.manifest
    n, d = len(folder), folder.dim
    if n == 0:
        raise EmbeddingFolderError(f"{folder.root} holds no {kind} embeddings (every shard is empty)")
    blank = _scan(folder)
    plan = choose_index(n, d, config)
    if plan.index_type == "ivfpq":
        need = max(plan.params["nlist"], PQ_MIN_TRAIN)
        if n < need:
            raise ValueError(f"{plan.factory} needs at least {need} vectors to train (nlist={plan.params['nlist']}, "
                             f"{PQ_MIN_TRAIN} for 8-bit PQ codes) but {folder.root} has {n}: use --index-type flat "
                             "(exact, right for this size) or hnsw")
    _logger.info("%s index for %d x %d %s vectors: %s (%s)", plan.index_type, n, d, kind, plan.factory, plan.reason)
    start = time.perf_counter()
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.index_type == "ivfpq":
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        # the factory turns on polysemous training (for Hamming-filtered search, unused here); it costs minutes
        ivf.do_polysemous_training = False
        ivf.pq.cp.max_points_per_centroid = 64  # 16k points train 256 centroids well; faiss's 65k take 4x longer
        if "k_factor" in plan.params:
            _set_knob(index, "k_factor_rf", plan.params["k_factor"])
    rng = np.random.default_rng(config.seed)
    if not index.is_trained:
        # enough for k-means (faiss caps PQ training at 256 points per centroid: 65,536 for 8-bit codes)
        size = min(n, config.train_size or max(256 * 64, 64 * plan.params.get("nlist", 1)))
        train_ids = np.sort(rng.choice(n, size=size, replace=False))
        try:
            index.train(_rows(folder, train_ids))
        except RuntimeError as err:  # faiss's own checks (too few points for a parameter choice)
            raise ValueError(f"{plan.factory} cannot be trained on {size} vectors of {folder.root}: "
                             f"{str(err).strip().splitlines()[-1]}; choose --index-type flat or hnsw, or a smaller "
                             "--nlist / --pq-m") from None
    for array in folder.iter_arrays():
        index.add(np.ascontiguousarray(array, dtype=np.float32))
    build_seconds = time.perf_counter() - start

    k = min(config.k, n)
    n_q = max(1, min(config.n_queries, n // 2 or 1))
    sample = rng.choice(n, size=min(n, 2 * n_q), replace=False)
    tune_q = _rows(folder, np.sort(sample[:n_q]))
    eval_q = _rows(folder, np.sort(sample[n_q:])) if len(sample) > n_q else tune_q
    knob, candidates = _knob(plan)
    chosen = None
    tuning = []
    if knob:
        tune_exact = _exact_topk(folder, tune_q, k)
        for value in candidates:
            _set_knob(index, knob, value)
            recall = recall_at_k(index.search(tune_q, k)[1], tune_exact)
            tuning.append({knob: value, f"recall@{k}": round(recall, 4)})
            chosen = value
            if recall >= config.target_recall:
                break
        _set_knob(index, knob, chosen)
        if tuning[-1][f"recall@{k}"] < config.target_recall:
            _logger.warning("%s did not reach recall@%d %.2f (best %.3f at %s=%d); give more max_memory or a larger "
                            "pq_m", plan.factory, k, config.target_recall, tuning[-1][f"recall@{k}"], knob, chosen)
    t0 = time.perf_counter()
    found = index.search(eval_q, k)[1]
    query_ms = 1000 * (time.perf_counter() - t0) / len(eval_q)
    expected = recall_at_k(found, _exact_topk(folder, eval_q, k)) if knob else 1.0

    blob = faiss.serialize_index(index)
    index_file, meta_file = index_paths(out_dir, kind)
    atomic_write_bytes(index_file, blob.tobytes())
    meta = {
        "kind": kind, "count": n, "dim": d, "metric": "inner_product",
        "index_type": plan.index_type, "factory": plan.factory, "reason": plan.reason, "params": plan.params,
        "search_params": {knob: chosen} if knob else {},
        "memory_bytes": int(blob.nbytes), "estimated_memory_bytes": plan.memory_bytes,
        "expected_recall": {f"recall@{k}": round(expected, 4), "queries": len(eval_q),
                            "measured_against": "exact inner-product search (IndexFlatIP), database vectors as queries"},
        "tuning": tuning, "target_recall": config.target_recall,
        "build_seconds": round(build_seconds, 3), "query_ms_per_vector": round(query_ms, 4),
        "blank_rows": blank,
        "embeddings": {**folder.describe(fingerprints=True),
                       "relative_root": os.path.relpath(os.path.abspath(folder.root), os.path.abspath(out)),
                       "manifest": manifest_identity(manifest)},
        "config": asdict(config),
        "faiss": faiss.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(meta_file, meta)
    _logger.info("wrote %s (%.1f MiB, expected recall@%d %.3f)", index_file, blob.nbytes / 2**20, k, expected)
    return meta


def read_index_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``{kind}.index.json``, checked for the fields search needs; ValueError naming the file otherwise."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable index description ({' '.join(str(err).split())}); rebuild the "
                         "index with vladva index EMBEDDINGS -o FOLDER") from None
    problem = None
    emb = meta.get("embeddings") if isinstance(meta, dict) else None
    if not isinstance(meta, dict):
        problem = f"a JSON {type(meta).__name__}, not an object"
    elif not isinstance(emb, dict) or not isinstance(emb.get("root"), str):
        problem = "no embeddings.root"
    elif not isinstance(emb.get("shards"), list) or not all(
            isinstance(x, dict) and isinstance(x.get("files"), dict) and isinstance(x.get("count"), int)
            for x in emb["shards"]):
        problem = "no per-shard fingerprints (embeddings.shards[].files): it predates them or was edited"
    elif not isinstance(meta.get("count"), int) or not isinstance(meta.get("dim"), int):
        problem = "no count/dim"
    elif not isinstance(meta.get("search_params", {}), dict):
        problem = "search_params is not an object"
    if problem:
        root = emb.get("root") if isinstance(emb, dict) and isinstance(emb.get("root"), str) else "EMBEDDINGS"
        raise ValueError(f"{path}: {problem}; rebuild the index: "
                         f"{rebuild_command(root, path.parent, path.name.split('.')[0])}")
    return meta
