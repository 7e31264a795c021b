"""``vladva analyze``: the paper's analyses for any registered VladVA model.

    vladva analyze prompts    --model vladva-llava7b --data flickr30k/dataset_flickr30k.json --images flickr30k/images
    vladva analyze next-token --model before=vladva-llava7b --model after=vladva-llava7b:my_adapter/ --data ...
    vladva analyze attention  --model before=... --model after=... --data ... --image-index 0 3
    vladva analyze retention  --model base=... --model vladva=... --model contrastive=... --n-scenes 64
    vladva analyze miniature  --out results/analysis

A model is ``[LABEL=]NAME[:PRETRAINED]`` (a tag, an adapter directory, a .safetensors or .pt checkpoint);
``--model-option KEY=VALUE`` passes a create_model keyword to every model (e.g. use_lora=false).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..cli_options import key_values

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def _subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable:
    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable:
        SUBCOMMANDS[name] = Subcommand(help, add_arguments, fn)
        return fn
    return wrap


# ---- shared options ----------------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser, several: bool) -> None:
    what = "models to compare, in order (e.g. before=NAME:TAG after=NAME:ADAPTER)" if several else "the model"
    p.add_argument("--model", action="append", required=True, metavar="[LABEL=]NAME[:PRETRAINED]", help=what)
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="create_model keyword for every model (value parsed as JSON when it can be)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="dtype of the frozen base weights")


def _data_args(p: argparse.ArgumentParser, captions: bool = True) -> None:
    g = p.add_argument_group("data (a paired annotation file, or an images folder and/or a captions file)")
    g.add_argument("--data", help="retrieval annotation file the evaluator reads (Karpathy, per-image, COCO)")
    g.add_argument("--images", help="images folder (of --data, or on its own: every image file in it)")
    if captions:
        g.add_argument("--captions", help="without --data: a text file, one caption per line")
    g.add_argument("--split", default="test", help="Karpathy split (default: test)")
    g.add_argument("--max-images", type=int, help="use the first N images (and their captions)")
    g.add_argument("--captions-per-image", type=int, help="keep each image's first K captions")
    g.add_argument("--skip-missing", action="store_true", help="leave out missing image files")


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", type=Path, default=Path(default_out), help=f"output folder (default: {default_out})")
    p.add_argument("--batch-size", type=int, default=None, help="images or captions per forward")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="CSV/JSON only")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--quiet", action="store_true", help="only warnings and the final summary")


def _indices(text: list[str] | None) -> list[int] | None:
    if text is None:
        return None
    return [int(x) for item in text for x in item.split(",") if x.strip()]


def _models(args: argparse.Namespace, single: bool = False):
    from .models import ModelRef, load_models, parse_model_ref

    options = key_values(args.model_option, "--model-option")
    refs = [parse_model_ref(m) for m in args.model]
    if single and len(refs) != 1:
        raise ValueError(f"this analysis takes one --model, got {len(refs)}")
    refs = [ModelRef(r.label, r.name, r.pretrained, {**options}) for r in refs]
    return load_models(refs, device=args.device, precision=args.precision)


def _data(args: argparse.Namespace):
    from .data import load_analysis_data

    return load_analysis_data(args.data, args.images, getattr(args, "captions", None), split=args.split,
                              max_images=args.max_images, captions_per_image=args.captions_per_image,
                              skip_missing=args.skip_missing)


def _print_files(files: dict[str, str]) -> None:
    print("\nwritten: " + ", ".join(files.values()))


# ---- prompts -----------------------------------------------------------------------------------------------
def _prompts_args(p: argparse.ArgumentParser) -> None:
    from .selection import SCORES

    _model_args(p, several=False)
    _data_args(p)
    _common(p, "analysis/prompts")
    p.add_argument("--prompts", help="candidate file: IMAGE PROMPT<TAB>TEXT PROMPT per line (default: the shipped "
                                     "50 pairs)")
    p.add_argument("--limit", type=int, help="use only the first N candidates")
    p.add_argument("--score", default="entropy+rank", choices=sorted(SCORES), help="label-free ranking score")
    p.add_argument("--cache-dir", help="per-prompt results cache (default: ~/.cache/vladva_openclip/analysis)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-reuse", dest="reuse", action="store_false",
                   help="run every prompt's whole sequence (no shared vision pass / LLM prefix); for checking")
    p.add_argument("--permutations", type=int, default=10000, help="for the correlations' p-values")
    p.add_argument("--apply", type=Path, metavar="OUT",
                   help="write an adapter using the recommended pair: create_model(NAME, pretrained=OUT)")


@_subcommand("prompts", "rank candidate prompts by next-token entropy and embedding rank (Figs. 2, 3, 5)",
             _prompts_args)
def _prompts(args: argparse.Namespace) -> int:
    from ..eval.cache import default_cache_dir
    from .prompt_search import PromptSearchConfig, apply_prompt_pair, search_prompts
    from .prompt_sets import default_prompt_pairs, load_prompt_pairs, validate_pairs

    pairs = load_prompt_pairs(args.prompts) if args.prompts else default_prompt_pairs()
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        pairs = validate_pairs(pairs[: args.limit])
    data = _data(args)
    ((model, preprocess),) = _models(args, single=True).values()
    cache = None if args.no_cache else (args.cache_dir or str(default_cache_dir().parent / "analysis"))
    cfg = PromptSearchConfig(batch_size=args.batch_size or 32, cache_dir=cache, score=args.score, reuse=args.reuse,
                             permutations=args.permutations, progress=args.progress)
    result = search_prompts(model, preprocess, data, pairs, cfg, model_id=args.model[0])
    files = result.save(args.out, plots=args.plots)
    print(result.to_markdown(top=10))
    print(f"\nscore ({result.score_name}): {result.score_definition}")
    if result.correlations:
        c = result.correlations
        print("Spearman with mean R@1: " + ", ".join(
            f"{k} {c[k]['mean_R@1']['rho']:+.2f} (p={c[k]['mean_R@1']['p']:.3f})"
            for k in ("image_entropy", "text_entropy", "image_k90", "text_k90", "score")))
    best = result.recommended
    print(f"\nrecommended pair:\n  image prompt: {best.image!r}\n  text prompt:  {best.text!r}")
    if args.apply:
        out = apply_prompt_pair(model, best, args.apply)
        print(f"\napplied: open_clip.create_model({model.model_name!r}, pretrained={str(out)!r})")
    _print_files(files)
    return 0


# ---- next-token --------------------------------------------------------------------------------------------
def _next_token_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, several=True)
    _data_args(p)
    _common(p, "analysis/next_token")
    p.add_argument("--image-index", nargs="+", help="images to show (indices, default: the first 4)")
    p.add_argument("--caption-index", nargs="+", help="captions to show (indices, default: the first 4)")
    p.add_argument("-k", "--top-k", type=int, default=10)
    p.add_argument("--image-prompt", help="handcrafted image prompt for every model (default: each model's own)")
    p.add_argument("--text-prompt", help="handcrafted text prompt for every model (default: each model's own)")


@_subcommand("next-token", "top-k next tokens at the summary position, model by model (Fig. 4)", _next_token_args)
def _next_token(args: argparse.Namespace) -> int:
    from .next_token import next_tokens

    data = _data(args)
    images = _indices(args.image_index)
    captions = _indices(args.caption_index)
    result = next_tokens(_models(args), data,
                         image_indices=images if images is not None else list(range(min(4, len(data.images)))),
                         caption_indices=captions if captions is not None else list(range(min(4, len(data.captions)))),
                         k=args.top_k, batch_size=args.batch_size or 16, image_prompt=args.image_prompt,
                         text_prompt=args.text_prompt)
    files = result.save(args.out, plots=args.plots)
    print(result.to_markdown())
    _print_files(files)
    return 0


# ---- attention ---------------------------------------------------------------------------------------------
def _attention_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, several=True)
    _data_args(p, captions=False)
    _common(p, "analysis/attention")
    p.add_argument("--image-index", nargs="+", help="images (indices, default: the first 4)")
    p.add_argument("--layers", nargs="+", help="LLM layers drawn in the PNG grids (default: up to 4, the last "
                                               "included; the entropies cover every layer)")
    p.add_argument("--heads", nargs="+", help="heads drawn in the PNG grids (default: the first 8)")
    p.add_argument("--image-prompt", help="handcrafted image prompt for every model (default: each model's own)")


@_subcommand("attention", "summary-token attention over the image, per layer and head, and its entropy (Fig. 6)",
             _attention_args)
def _attention(args: argparse.Namespace) -> int:
    from .attention import attention_maps

    data = _data(args)
    result = attention_maps(_models(args), data, image_indices=_indices(args.image_index),
                            batch_size=args.batch_size or 4, image_prompt=args.image_prompt)
    layers, heads = _indices(args.layers), _indices(args.heads)
    for name, chosen, avail in (("layer", layers, result.layers), ("head", heads, result.heads)):
        bad = [x for x in chosen or [] if x not in avail]
        if bad:
            raise ValueError(f"{name}s {bad} do not exist; the model has {name}s 0..{len(avail) - 1}")
    files = result.save(args.out, plots=args.plots, map_layers=layers, map_heads=heads)
    print(result.to_markdown())
    _print_files(files)
    return 0


# ---- retention ---------------------------------------------------------------------------------------------
def _retention_args(p: argparse.ArgumentParser) -> None:
    from ..demo.pipeline import DemoConfig
    from .retention import CAPTION_INSTRUCTION

    _model_args(p, several=True)
    _common(p, "analysis/retention")
    g = p.add_argument_group("images (default: synthetic-world scenes, checked fact by fact)")
    g.add_argument("--n-scenes", type=int, default=64)
    g.add_argument("--world-seed", type=int, default=7)
    g.add_argument("--world-split", default="train", choices=("train", "test"),
                   help="train: the seen colour-shape pairs; test: every scene holds a held-out pair")
    g.add_argument("--long-captions", default=DemoConfig.long_captions,
                   help=f"style of the reference descriptions: full or compact (default: the demo's, "
                        f"{DemoConfig.long_captions})")
    g.add_argument("--extra-style", action="append", default=[],
                   help="also score the same scenes' descriptions in this style (reference NLL only)")
    _data_args(p, captions=False)
    p.add_argument("--instruction", default=CAPTION_INSTRUCTION, help="captioning prompt for every model")
    p.add_argument("--max-new-tokens", type=int, default=128)


@_subcommand("retention", "caption with each model; facts checked against the scene, reference NLL (Fig. 7)",
             _retention_args)
def _retention(args: argparse.Namespace) -> int:
    from .retention import RetentionConfig, caption_retention, data_scenes, world_scenes

    scenes = data_scenes(_data(args)) if args.data or args.images else world_scenes(
        args.n_scenes, args.world_seed, args.world_split, long_captions=args.long_captions,
        extra_styles=args.extra_style)
    cfg = RetentionConfig(instruction=args.instruction, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size or 16, progress=args.progress)
    result = caption_retention(_models(args), scenes, cfg)
    files = result.save(args.out, plots=args.plots)
    print(result.to_markdown())
    _print_files(files)
    return 0


# ---- miniature ---------------------------------------------------------------------------------------------
def _miniature_args(p: argparse.ArgumentParser) -> None:
    from .miniature import PRESETS

    p.add_argument("--out", type=Path, default=Path("results/analysis"))
    p.add_argument("--work", type=Path, default=Path("vladva_analysis_work"),
                   help="world, fine-tuning runs and adapters (not part of the results)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--quiet", action="store_true")


@_subcommand("miniature", "all of the above on the embedded default (captioner and its fine-tunes)",
             _miniature_args)
def _miniature(args: argparse.Namespace) -> int:
    from .miniature import preset, run_miniature

    cfg = preset(args.preset, out=args.out, work=args.work, threads=args.threads, progress=args.progress)
    summary = run_miniature(cfg)
    print(json.dumps(summary["headline"], indent=1))
    print(f"\nwritten under {args.out}")
    return 0


# ---- entry -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vladva analyze", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name, cmd in SUBCOMMANDS.items():
        cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..cli_logging import setup_cli_logging
    from ..eval.errors import EvalDataError
    from .models import ModelBuildError
    from .prompt_sets import PromptFileError

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_cli_logging(getattr(args, "quiet", False))
    try:
        return int(SUBCOMMANDS[args.analysis].run(args) or 0)
    except (PromptFileError, ModelBuildError, EvalDataError, FileNotFoundError, IndexError, ValueError,
            TypeError) as err:
        print(f"vladva analyze {args.analysis}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
