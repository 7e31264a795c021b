"""``vladva-clip-benchmark``: LAION's CLIP_benchmark CLI, unchanged, in a process where the plugin is registered.

CLIP_benchmark loads models with ``open_clip.create_model_and_transforms(name, pretrained=...)`` looked up at call
time, so once ``import vladva_openclip`` has installed the integration, VladVA names work with its default
``--model_type open_clip``. A plain ``clip_benchmark`` process never imports the plugin (CLIP_benchmark issue
#144), hence this entry point. Options before the subcommand that belong to this wrapper:

    --model-config-dir DIR   add an open_clip model-config folder first (repeatable)
    --precision P            dtype the frozen base of a VladVA model is loaded in: auto (default: bf16 on CUDA,
                             fp32 on CPU), fp32, bf16 or fp16. CLIP_benchmark itself builds every model in fp32 on
                             the CPU and then moves it; for VladVA names this wrapper's loader builds the base
                             directly in that dtype on the evaluation device instead (no fp32 copy, no host
                             staging). Other models load exactly as CLIP_benchmark loads them.

Everything else is passed to ``clip_benchmark`` as is, e.g.::

    vladva-clip-benchmark --precision bf16 eval --model vladva-llava7b --pretrained adapter.safetensors \\
        --dataset wds/flickr30k --dataset_root data/{dataset_cleaned} --task zeroshot_retrieval \\
        --recall_k 1 5 10 --no_amp --output out.json

With a bf16 base, ``--no_amp`` keeps CLIP_benchmark's autocast (float16 on CUDA) from re-casting the bf16 weights.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["WrapperOptions", "main", "parse_wrapper_args", "split_wrapper_args", "vladva_loader"]

_USAGE = ("usage: vladva-clip-benchmark [--model-config-dir DIR ...] [--precision {auto,fp32,bf16,fp16}] "
          "{eval,build} ... (see clip_benchmark --help)")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class WrapperOptions:
    """This wrapper's own options (they come before CLIP_benchmark's subcommand)."""

    model_config_dirs: list[str] = field(default_factory=list)
    precision: str = "auto"


def parse_wrapper_args(argv: Sequence[str]) -> tuple[WrapperOptions, list[str]]:
    """Take this wrapper's leading options off ``argv``: -> (options, arguments for clip_benchmark)."""
    argv = list(argv)
    opts = WrapperOptions()
    flags = {"--model-config-dir", "--precision"}
    while argv and argv[0].split("=", 1)[0] in flags:
        flag, sep, value = argv.pop(0).partition("=")
        if not sep:
            if not argv:
                raise SystemExit(f"{flag} needs a value\n{_USAGE}")
            value = argv.pop(0)
        if flag == "--model-config-dir":
            opts.model_config_dirs.append(value)
        elif value not in PRECISIONS:
            raise SystemExit(f"--precision must be one of {', '.join(PRECISIONS)}, got {value!r}\n{_USAGE}")
        else:
            opts.precision = value
    return opts, argv


def split_wrapper_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Take this wrapper's leading options off ``argv``: -> (model config dirs, arguments for clip_benchmark)."""
    opts, rest = parse_wrapper_args(argv)
    return opts.model_config_dirs, rest


def vladva_loader(original: Callable, precision: str) -> Callable:
    """CLIP_benchmark's ``open_clip`` loader, except that VladVA names are built in ``precision`` on the device."""

    def load_open_clip(model_name: str, pretrained: str, cache_dir: str | None = None, device="cpu"):
        import open_clip
        import torch

        from ..registry import is_vladva_name

        if not is_vladva_name(model_name):
            return original(model_name=model_name, pretrained=pretrained, cache_dir=cache_dir, device=device)
        prec = precision
        if prec == "auto":
            prec = "bf16" if torch.device(device).type == "cuda" else "fp32"
        model, _, transform = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, cache_dir=cache_dir, precision=prec, device=device)
        return model, transform, open_clip.get_tokenizer(model_name)

    return load_open_clip


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clip_benchmark`` with ``argv`` (default: the command line) after registering the plugin."""
    try:
        from clip_benchmark import cli as cb_cli
        from clip_benchmark import models as cb_models
    except ImportError as err:  # the package, or one of its undeclared dependencies (e.g. requests)
        print(f"vladva-clip-benchmark cannot import CLIP_benchmark ({err}): pip install 'vladva_openclip[bench]' "
              "(clip-benchmark==1.6.2 and what it needs)", file=sys.stderr)
        return 2
    import open_clip

    import vladva_openclip  # noqa: F401  (registers the VladVA model names with open_clip)

    opts, rest = parse_wrapper_args(sys.argv[1:] if argv is None else argv)
    for d in opts.model_config_dirs:
        open_clip.add_model_config(d)
    # clip_benchmark's parser reads sys.argv itself; hand it exactly the arguments it would have seen
    saved_argv, saved_loader = sys.argv, cb_models.TYPE2FUNC["open_clip"]
    sys.argv = ["clip_benchmark", *rest]
    cb_models.TYPE2FUNC["open_clip"] = vladva_loader(saved_loader, opts.precision)
    try:
        return cb_cli.main() or 0
    finally:
        sys.argv = saved_argv
        cb_models.TYPE2FUNC["open_clip"] = saved_loader


if __name__ == "__main__":
    sys.exit(main())
