"""Recall@10 against exact search, memory and speed of `vladva index`'s index types on a synthetic set.

The set mimics normalised embeddings: a mixture of Gaussian clusters on the sphere (cluster centres random unit
vectors, points = centre + isotropic noise, re-normalised). The database is written as an embedding folder in
clip-retrieval's layout (float16, as `vladva embed` writes it) and indexed by the project's own `build_index`; the
queries are fresh points of the same mixture, not in the database, and the reference is exact inner-product search.

    python -m benchmarks.bench_index       # 100k x 256, 1000 queries: flat, hnsw, ivfpq (+ SQ8 re-rank), PQ only, auto
    python -m benchmarks.bench_index --n 20000 --types hnsw ivfpq --threads 2
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from vladva_openclip.retrieval.index import IndexConfig, _exact_topk, build_index, import_faiss, recall_at_k
from vladva_openclip.retrieval.layout import EmbeddingFolder, OutputFolder

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_clusters(n: int, d: int, n_clusters: int = 1000, noise: float = 0.6, seed: int = 0,
                       centres_seed: int = 1234) -> np.ndarray:
    """[n, d] float32 unit vectors: cluster centre (fixed by ``centres_seed``) + noise of norm about ``noise``."""
    centres = np.random.default_rng(centres_seed).standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, n_clusters, n)] + noise / np.sqrt(d) * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embedding_folder(root: Path, vectors: np.ndarray, shard_size: int = 50_000) -> Path:
    """``vectors`` as image embeddings (float16) in clip-retrieval's layout, with minimal metadata."""
    count = -(-len(vectors) // shard_size)
    out = OutputFolder(root, count)
    for k in range(count):
        rows = np.arange(k * shard_size, min((k + 1) * shard_size, len(vectors)))
        out.write_shard(k, {"image": vectors[rows].astype(np.float16)},
                        pd.DataFrame({"image_path": [f"item{r}" for r in rows], "caption": None, "row": rows}), {})
    return root


def measure(folder: Path, out: Path, index_type: str, queries: np.ndarray, exact: np.ndarray,
            config: dict) -> dict:
    faiss = import_faiss()
    t0 = time.perf_counter()
    kind, _, variant = index_type.partition("-")  # "ivfpq-norefine": PQ codes only
    meta = build_index(folder, out / index_type, "image",
                       IndexConfig(index_type=kind, refine=False if variant == "norefine" else None, **config))
    build = time.perf_counter() - t0
    index = faiss.read_index(str(out / index_type / "image.index"))
    for name, value in meta["search_params"].items():  # the tuned knob is not stored in the index file
        faiss.ParameterSpace().set_index_parameter(index, name, value)
    t0 = time.perf_counter()
    found = index.search(queries, exact.shape[1])[1]
    per_query_ms = 1000 * (time.perf_counter() - t0) / len(queries)
    return {"asked": index_type, "factory": meta["factory"], "search_params": meta["search_params"],
            "recall@10_fresh_queries": round(recall_at_k(found, exact), 4),
            "expected_recall@10_in_metadata": meta["expected_recall"]["recall@10"],
            "memory_mib": round(meta["memory_bytes"] / 2**20, 2), "total_seconds_incl_tuning": round(build, 1),
            "index_build_seconds": meta["build_seconds"], "query_ms": round(per_query_ms, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--types", nargs="+", default=["flat", "hnsw", "ivfpq", "ivfpq-norefine", "auto"])
    p.add_argument("--flat-threshold", type=int, default=50_000, help="for the auto row")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "index.json")
    args = p.parse_args(argv)
    faiss = import_faiss()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = write_embedding_folder(tmp / "emb", synthetic_clusters(args.n, args.d, seed=0))
        queries = synthetic_clusters(args.queries, args.d, seed=1)
        exact = _exact_topk(EmbeddingFolder(folder), queries, 10)
        config = {"flat_threshold": args.flat_threshold, "n_queries": 500, "threads": args.threads}
        rows = []
        for t in args.types:
            rows.append(measure(folder, tmp / "idx", t, queries, exact, config))
            print(json.dumps(rows[-1]), flush=True)
    report = {"n": args.n, "d": args.d, "queries": args.queries, "faiss": faiss.__version__,
              "threads": faiss.omp_get_max_threads(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.n} x {args.d} synthetic vectors, {args.queries} fresh queries, recall@10 vs exact search\n")
    print("| asked | index | search | recall@10 (fresh queries) | expected (metadata) | memory MiB | build+tune s "
          "| ms/query |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['asked']} | {r['factory']} | {r['search_params'] or 'exact'} | {r['recall@10_fresh_queries']} "
              f"| {r['expected_recall@10_in_metadata']} | {r['memory_mib']} | {r['total_seconds_incl_tuning']} "
              f"| {r['query_ms']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
