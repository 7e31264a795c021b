"""``python -m vladva_openclip.synth --out DIR --n-train N --n-test M``: build a synthetic world on disk."""
from __future__ import annotations

import argparse
import logging
import sys

from .build import build_world
from .config import WorldConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vladva_openclip.synth", description=__doc__)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--n-train", type=int, default=1000, help="training scenes")
    p.add_argument("--n-test", type=int, default=200, help="test scenes (held-out combos; eval sets)")
    p.add_argument("--n-winoground", type=int, default=None, help="Winoground pairs (default n_test // 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--captions-per-image", type=int, default=2, help="captions per image in the retrieval set")
    p.add_argument("--short-captions", default="detailed", help="train split's short captions: detailed | coarse")
    p.add_argument("--long-captions", default="full", help="long descriptions: full | compact")
    p.add_argument("--text-pairs", action="store_true",
                   help="add caption/paraphrase columns to the training table (E5-V-style text pairs)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per webdataset shard")
    p.add_argument("--sep", default="\t", help="table separator (default tab; ',' writes .csv)")
    p.add_argument("--no-csv", action="store_true", help="do not write the training table and PNG folder")
    p.add_argument("--no-wds", action="store_true", help="do not write webdataset shards")
    p.add_argument("--no-eval", action="store_true", help="do not write the test split and eval sets")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    config = WorldConfig(image_size=args.image_size, captions_per_image=args.captions_per_image, seed=args.seed,
                         short_captions=args.short_captions, long_captions=args.long_captions)
    paths = build_world(
        args.out, n_train=args.n_train, n_test=args.n_test, config=config, n_winoground=args.n_winoground,
        shard_size=args.shard_size, write_csv=not args.no_csv, write_wds=not args.no_wds,
        write_eval=not args.no_eval, sep=args.sep, text_pairs=args.text_pairs, progress=not args.quiet,
    )
    for name, value in vars(paths).items():
        if value not in (None, [], {}) and name != "train_shard_files":
            print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
