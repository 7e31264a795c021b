"""``vladva-clip-benchmark``: LAION's CLIP_benchmark CLI, unchanged, in a process where the plugin is registered.

CLIP_benchmark loads models with ``open_clip.create_model_and_transforms(name, pretrained=...)`` looked up at call
time, so once ``import vladva_openclip`` has installed the integration, VladVA names work with its default
``--model_type open_clip``. A plain ``clip_benchmark`` process never imports the plugin (CLIP_benchmark issue
#144), hence this entry point. Options before the subcommand that belong to this wrapper:

    --model-config-dir DIR   add an open_clip model-config folder first (repeatable)

Everything else is passed to ``clip_benchmark`` as is, e.g.::

    vladva-clip-benchmark eval --model vladva-llava7b --pretrained adapter.safetensors \\
        --dataset wds/flickr30k --dataset_root data/{dataset_cleaned} --task zeroshot_retrieval \\
        --recall_k 1 5 10 --no_amp --output out.json
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main", "split_wrapper_args"]

_USAGE = "usage: vladva-clip-benchmark [--model-config-dir DIR ...] {eval,build} ... (see clip_benchmark --help)"


def split_wrapper_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Take this wrapper's leading options off ``argv``: -> (model config dirs, arguments for clip_benchmark)."""
    argv = list(argv)
    dirs = []
    while argv and (argv[0] == "--model-config-dir" or argv[0].startswith("--model-config-dir=")):
        flag = argv.pop(0)
        if "=" in flag:
            dirs.append(flag.split("=", 1)[1])
        elif argv:
            dirs.append(argv.pop(0))
        else:
            raise SystemExit(f"--model-config-dir needs a folder\n{_USAGE}")
    return dirs, argv


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clip_benchmark`` with ``argv`` (default: the command line) after registering the plugin."""
    try:
        from clip_benchmark import cli as cb_cli
    except ImportError as err:  # the package, or one of its undeclared dependencies (e.g. requests)
        print(f"vladva-clip-benchmark cannot import CLIP_benchmark ({err}): pip install 'vladva_openclip[bench]' "
              "(clip-benchmark==1.6.2 and what it needs)", file=sys.stderr)
        return 2
    import open_clip

    import vladva_openclip  # noqa: F401  (registers the VladVA model names with open_clip)

    dirs, rest = split_wrapper_args(sys.argv[1:] if argv is None else argv)
    for d in dirs:
        open_clip.add_model_config(d)
    # clip_benchmark's parser reads sys.argv itself; hand it exactly the arguments it would have seen
    saved = sys.argv
    sys.argv = ["clip_benchmark", *rest]
    try:
        return cb_cli.main() or 0
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
