"""``vladva embed``, ``vladva index`` and ``vladva search``: argument parsing and wiring only.

Each command is registered with the ``vladva`` command's registry by :func:`register_commands`; the heavy imports
(torch, open_clip, faiss) happen when a command runs, not when ``vladva --help`` is printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

_logger = logging.getLogger(__name__)


def _model_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, default=None,
                   help="open_clip model name (a vladva-* name, ViT-B-32, hf-hub:org/repo, ...)")
    p.add_argument("--pretrained", default=None, help="pretrained tag, adapter directory or checkpoint file")
    p.add_argument("--model-config-dir", action="append", default=[], metavar="DIR",
                   help="extra open_clip model-config folder (open_clip.add_model_config); repeatable")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    p.add_argument("--precision", default=None, help="fp32 (default), amp, amp_bf16, fp16, bf16, ...")


def _add_model_configs(dirs: list[str]) -> None:
    if dirs:
        import open_clip

        for d in dirs:
            open_clip.add_model_config(d)


# ---- embed ---------------------------------------------------------------------------------------------------
def _embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="image folder, .csv/.tsv table, or webdataset shards (e.g. 'data/{00000..00099}.tar')")
    p.add_argument("--output", "-o", required=True, help="embedding folder (clip-retrieval layout)")
    _model_arguments(p, required=True)
    p.add_argument("--input-format", default="auto", choices=["auto", "folder", "table", "webdataset"])
    p.add_argument("--no-images", dest="images", action="store_false", help="caption embeddings only")
    texts = p.add_mutually_exclusive_group()
    texts.add_argument("--texts", dest="texts", action="store_const", const=True, default=None,
                       help="embed captions; rows without one keep their image embedding and get an all-zero "
                            "text vector, counted in the manifest (default: when every row has one)")
    texts.add_argument("--no-texts", dest="texts", action="store_const", const=False, help="image embeddings only")
    p.add_argument("--shard-size", type=int, default=50_000,
                   help="rows per output shard, the unit of resuming (default: %(default)s; webdataset: one per tar)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="embedding dtype on disk (default float16, as clip-retrieval)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="image-decoding processes per rank")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default=None, help="default: 'title' or 'caption' when present")
    p.add_argument("--csv-separator", default=None, help="default: tab for .tsv, comma for .csv")
    p.add_argument("--wds-caption-key", default="txt")
    p.add_argument("--overwrite", action="store_true", help="replace a job with other settings in --output")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _embed(args: argparse.Namespace) -> int:
    from .embed import EmbedJobConfig, EmbedJobError, run_embed

    _add_model_configs(args.model_config_dir)
    keys = ("input", "output", "model", "pretrained", "input_format", "images", "texts", "shard_size", "dtype",
            "batch_size", "workers", "device", "csv_img_key", "csv_caption_key", "csv_separator",
            "wds_caption_key", "overwrite", "progress")
    try:
        config = EmbedJobConfig(**{k: getattr(args, k) for k in keys}, precision=args.precision or "fp32")
        manifest = run_embed(config)
    except (EmbedJobError, ValueError, OSError) as err:
        print(f"vladva embed: error: {_one_line(err)}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"embedded {c['embedded']} rows ({c['images']} images, {c['texts']} captions; {c['skipped']} skipped) "
          f"into {c['shards']} shards of {args.output} in {manifest['seconds']:.1f} s")
    return 0


# ---- index ---------------------------------------------------------------------------------------------------
def _index_arguments(p: argparse.ArgumentParser) -> None:
    from .index import INDEX_TYPES, IndexConfig

    d = IndexConfig()
    p.add_argument("embeddings", help="embedding folder (from vladva embed or clip-retrieval)")
    p.add_argument("--output", "-o", required=True, help="index folder ({kind}.index + {kind}.index.json)")
    p.add_argument("--kind", default="image", choices=["image", "text"])
    p.add_argument("--index-type", default=d.index_type, choices=INDEX_TYPES)
    p.add_argument("--flat-threshold", type=int, default=d.flat_threshold,
                   help="largest number of vectors kept exact (default: %(default)s)")
    p.add_argument("--max-memory", default=d.max_memory, help="memory budget of the index (default: %(default)s)")
    p.add_argument("--target-recall", type=float, default=d.target_recall,
                   help="recall@k that nprobe/efSearch are tuned to (default: %(default)s)")
    p.add_argument("--hnsw-m", type=int, default=d.hnsw_m)
    p.add_argument("--nlist", dest="ivf_nlist", type=int, default=None)
    p.add_argument("--pq-m", type=int, default=None)
    p.add_argument("--queries", dest="n_queries", type=int, default=d.n_queries,
                   help="database vectors for tuning and, separately, for the expected recall")
    p.add_argument("--k", type=int, default=d.k, help="the k of recall@k (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None)


def _index(args: argparse.Namespace) -> int:
    from .index import IndexConfig, build_index

    try:
        config = IndexConfig(**{k: getattr(args, k) for k in (
            "index_type", "flat_threshold", "max_memory", "target_recall", "hnsw_m", "ivf_nlist", "pq_m",
            "n_queries", "k", "threads")})
        meta = build_index(args.embeddings, args.output, args.kind, config)
    except (ValueError, OSError, ImportError) as err:
        print(f"vladva index: error: {_one_line(err)}", file=sys.stderr)
        return 2
    recall = ", ".join(f"{k} {v}" for k, v in meta["expected_recall"].items() if k.startswith("recall"))
    print(f"{meta['factory']} over {meta['count']} x {meta['dim']} vectors: {meta['memory_bytes'] / 2**20:.1f} MiB, "
          f"expected {recall}, search {meta['search_params'] or 'exact'} ({meta['reason']})")
    return 0


# ---- search --------------------------------------------------------------------------------------------------
def _search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="index folder (vladva index) or embedding folder (exact search)")
    p.add_argument("--text", action="append", default=[], help="a text query; repeatable")
    p.add_argument("--image", action="append", default=[], help="an image file as query; repeatable")
    p.add_argument("-k", "--k", type=int, default=10)
    p.add_argument("--kind", default="image", choices=["image", "text"], help="search image or caption embeddings")
    _model_arguments(p, required=False)
    p.add_argument("--json", dest="json_out", default=None, help="write the results here instead of stdout")
    p.add_argument("--html", default=None, metavar="OUT", help="also write a static page with thumbnails")


def _output_file(path: str | None, flag: str) -> str | None:
    """An error line when ``path`` cannot be an output file (a folder, or under a file)."""
    if path is None:
        return None
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        return f"{flag} {path} is a folder: give a file name, e.g. {p / ('hits.json' if flag == '--json' else 'hits.html')}"
    if any(parent.exists() and not parent.is_dir() for parent in p.absolute().parents):
        return f"{flag} {path}: a part of the path is a file, not a folder; give another path"
    return None


def _search(args: argparse.Namespace) -> int:
    from .search import Query, run_search

    _add_model_configs(args.model_config_dir)
    queries = [Query("text", t) for t in args.text] + [Query("image", i) for i in args.image]
    problem = _output_file(args.json_out, "--json") or _output_file(args.html, "--html")
    if problem:
        print(f"vladva search: error: {problem}", file=sys.stderr)
        return 2
    try:
        results = run_search(args.source, queries, k=args.k, kind=args.kind, model=args.model,
                             pretrained=args.pretrained, device=args.device or "cpu", precision=args.precision)
        text = json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False)  # standard JSON only
        if args.json_out:
            from pathlib import Path

            from .layout import atomic_write_bytes

            atomic_write_bytes(Path(args.json_out), (text + "\n").encode("utf-8"))
        else:
            print(text)
        if args.html:
            from .html import write_html

            path = write_html(results, args.html, title="vladva search: " + "; ".join(q.value for q in queries))
            print(f"page: {path}", file=sys.stderr)
    except (ValueError, OSError, ImportError) as err:
        print(f"vladva search: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (OSError: with the file it names)."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err)
    return " ".join(text.split())


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "embed": ("embeddings of an image folder / table / webdataset in clip-retrieval's layout (torchrun-ready)",
              _embed_arguments, _embed),
    "index": ("a FAISS index over an embedding folder, chosen by size, with its expected recall", _index_arguments,
              _index),
    "search": ("text or image queries against an index or embedding folder: top-k JSON, optional HTML page",
               _search_arguments, _search),
}


def register_commands(register: Callable, setup_logging: Callable[[bool], None] | None = None) -> None:
    """Add the commands to ``vladva``'s registry (``register(name, help, add_arguments)(run)``)."""
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        def wrapped(args: argparse.Namespace, run=run) -> int:
            if setup_logging is not None:
                setup_logging(False)
            return run(args)
        register(name, help_text, add_arguments)(wrapped)
