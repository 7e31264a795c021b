"""Cost of a huge caption cell: the tokenizer's character bound against tokenizing the whole text first.

A table cell of 5 MB once cost 16 s per batch: the whole caption was tokenized before truncation. The caption
tokenizer now reads only ``char_bound(context_length)`` characters (``4 x (length + 16) x`` the longest token), which
gives the same ids. This times both on the real LLaVA-1.5 and Qwen2-VL vocabularies (``../shared/data/tokenizers``)
at the text tower's context length (77): bounded ``tok([caption])`` (median of 3 after a warm-up) against the
unbounded whole-text fit (``tok._fit_caption`` on the full caption, one run), and checks the ids are equal.

    python -m benchmarks.bench_caption_bound              # 5 MB caption
    python -m benchmarks.bench_caption_bound --mb 1
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._harness import REPO, RESULTS, machine_name

TOKENIZERS = REPO.parent / "shared" / "data" / "tokenizers"
MODELS = {"llava-1.5": "vladva-llava7b", "qwen2-vl": "vladva-qwen2vl2b"}


def _tokenizer(family: str, tmp: Path):
    import open_clip

    import vladva_openclip  # noqa: F401  (registers the VladVA models)

    dest = tmp / family
    dest.mkdir()
    shutil.copy(TOKENIZERS / family / "tokenizer_config.json", dest / "tokenizer_config.json")
    with gzip.open(TOKENIZERS / family / "tokenizer.json.gz", "rb") as f, open(dest / "tokenizer.json", "wb") as g:
        shutil.copyfileobj(f, g)
    return open_clip.get_tokenizer(MODELS[family], tokenizer=str(dest))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=5.0, help="caption size in MB (default: %(default)s)")
    p.add_argument("--length", type=int, default=77, help="context length (default: %(default)s)")
    args = p.parse_args(argv)
    if not TOKENIZERS.is_dir():
        raise SystemExit(f"needs the real tokenizers in {TOKENIZERS}")
    caption = "word " * int(args.mb * 1e6 / 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in MODELS:
            tok = _tokenizer(family, Path(tmp))
            tok(["warm up the codecs"], context_length=args.length)
            times = []
            for _ in range(4):
                t0 = time.perf_counter()
                bounded = tok([caption], context_length=args.length)[0]
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            full, _ = tok._fit_caption(caption, args.length)
            unbounded = time.perf_counter() - t0
            same = bounded[: len(full)].tolist() == full
            median = statistics.median(times[1:])
            rows.append({"tokenizer": family, "caption_mb": args.mb, "context_length": args.length,
                         "char_bound": tok.char_bound(args.length), "bounded_s": round(median, 4),
                         "unbounded_s": round(unbounded, 3), "ratio": round(unbounded / median, 1), "same_ids": same})
            print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "caption_bound.json"
    out.write_text(json.dumps({"machine": machine_name("cpu"), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
