"""``vladva caption``: argument parsing and wiring only (registered with the ``vladva`` command)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from ..cli_options import key_values
from .prompts import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import backends  # noqa: F401  (registration)
    from .backends.base import BACKENDS
    from .config import CaptionJobConfig, GenerationSettings, QualitySettings

    d, g, q = CaptionJobConfig("", ""), GenerationSettings(), QualitySettings()
    p.add_argument("input", nargs="?", help="image folder, .csv/.tsv/.parquet table (img2dataset columns) or "
                                            "webdataset shards (e.g. 'shards/{00000..00099}.tar')")
    p.add_argument("--output", "-o", help="job folder (sidecar parquets, manifest; resumable)")
    p.add_argument("--verify", metavar="OUT", help="check a job folder for missing or duplicate keys and exit")
    m = p.add_argument_group("captioner")
    m.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="auto: vllm for --hf-model when vLLM and a GPU are there, else hf; vladva for --model")
    m.add_argument("--model", help="a VladVA model name, e.g. vladva-tiny-llava (its base LVLM captions)")
    m.add_argument("--pretrained", help="its pretrained tag or adapter directory, e.g. synth_captioner")
    m.add_argument("--model-config-dir", action="append", default=[], metavar="DIR",
                   help="extra open_clip model-config folder; repeatable")
    m.add_argument("--hf-model", help="transformers image-text-to-text checkpoint: local directory or hub-cache id")
    m.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    m.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")
    m.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM argument (VALUE parsed as JSON when it is), e.g. max_model_len=4096")
    w = p.add_argument_group("what to generate")
    w.add_argument("--kind", default=d.kind, choices=["long", "short", "both"])
    w.add_argument("--only-missing", action="store_true",
                   help="keep an existing caption (under --short-max-tokens: the short one, else the long one) and "
                        "generate only what a row lacks")
    w.add_argument("--long-prompt", default="long", help=f"preset ({', '.join(PRESETS)}) or text (default: long)")
    w.add_argument("--short-prompt", default="short", help="preset or text (default: short)")
    w.add_argument("--prompt", help="your own instruction for the one kind asked (--kind long or short)")
    w.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens, help="long captions' token budget")
    w.add_argument("--short-max-new-tokens", type=int, default=48, help="short captions' token budget")
    w.add_argument("--repetition-penalty", type=float, default=g.repetition_penalty, help="1.0 = off; 1.05-1.2 "
                                                                                           "curbs loops")
    w.add_argument("--no-repeat-ngram-size", type=int, default=0, help="0 = off (vladva and hf backends)")
    w.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, reproducible)")
    w.add_argument("--seed", type=int, default=0)
    f = p.add_argument_group("quality flags")
    f.add_argument("--target-tokenizer", help="count lengths in this tokenizer: an open_clip model name (e.g. "
                                              "vladva-llava7b) or a tokenizer directory (default: the captioner's)")
    f.add_argument("--short-max-tokens", type=int, default=q.short_max_tokens)
    f.add_argument("--long-min-tokens", type=int, default=q.long_min_tokens)
    f.add_argument("--long-max-tokens", type=int, default=q.long_max_tokens)
    f.add_argument("--clip-model", help="score captions with this open_clip model (e.g. ViT-B-32)")
    f.add_argument("--clip-pretrained", help="its pretrained tag (e.g. openai)")
    f.add_argument("--min-clip-score", type=float, help="flag captions below this CLIP score (100 x cosine)")
    i = p.add_argument_group("input and output")
    i.add_argument("--input-format", default="auto", choices=["auto", "folder", "table", "webdataset"])
    i.add_argument("--shard-size", type=int, default=d.shard_size,
                   help="rows per partition of a folder/table, the unit of resuming (webdataset: one per tar)")
    i.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per generate call (vllm: requests per LLM.generate call; use hundreds)")
    i.add_argument("--workers", type=int, default=d.workers, help="image-decoding processes per rank")
    i.add_argument("--img-key", help="table column of the image path (default: filepath/path/image_path/...)")
    i.add_argument("--caption-key", help="table column of the alt-text (default: caption/title/text)")
    i.add_argument("--key-column", help="table column of the sample key (default: key when present, else the path)")
    i.add_argument("--csv-separator", help="default: tab for .tsv, comma for .csv")
    i.add_argument("--wds-caption-key", default="txt", help="alt-text member (json's caption is the fallback)")
    i.add_argument("--write-wds", action="store_true", help="also write the shards with long.txt into OUT/wds/")
    i.add_argument("--write-csv", action="store_true", help="also write OUT/captions.tsv for vladva-train")
    i.add_argument("--overwrite", action="store_true", help="replace a job with other settings in OUT")
    i.add_argument("--no-progress", dest="progress", action="store_false")
    i.add_argument("--quiet", action="store_true")


def config_from_args(args: argparse.Namespace):
    from .config import CaptionJobConfig, GenerationSettings, QualitySettings

    if not args.input or not args.output:
        raise ValueError("give INPUT and --output OUT (or --verify OUT)")
    long_prompt, short_prompt = args.long_prompt, args.short_prompt
    if args.prompt is not None:
        if args.kind == "both":
            raise ValueError("--prompt sets the instruction of one kind: with --kind both use --long-prompt and "
                             "--short-prompt")
        long_prompt, short_prompt = (args.prompt, short_prompt) if args.kind == "long" else (long_prompt, args.prompt)
    gen = {"repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
           "temperature": args.temperature, "seed": args.seed}
    return CaptionJobConfig(
        input=args.input, output=args.output, backend=args.backend, model=args.model, pretrained=args.pretrained,
        hf_model=args.hf_model, kind=args.kind, only_missing=args.only_missing, long_prompt=long_prompt,
        short_prompt=short_prompt, long_generation=GenerationSettings(max_new_tokens=args.max_new_tokens, **gen),
        short_generation=GenerationSettings(max_new_tokens=args.short_max_new_tokens, **gen),
        quality=QualitySettings(short_max_tokens=args.short_max_tokens, long_min_tokens=args.long_min_tokens,
                                long_max_tokens=args.long_max_tokens, min_clip_score=args.min_clip_score),
        target_tokenizer=args.target_tokenizer, input_format=args.input_format, shard_size=args.shard_size,
        batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision,
        img_key=args.img_key, caption_key=args.caption_key, key_column=args.key_column,
        csv_separator=args.csv_separator, wds_caption_key=args.wds_caption_key, clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained, write_wds=args.write_wds, write_csv=args.write_csv,
        vllm_args=key_values(args.vllm_arg, "--vllm-arg"), overwrite=args.overwrite, progress=args.progress)


def _verify(out: str) -> int:
    from .verify import verify_output

    report = verify_output(out)
    print(json.dumps(report, indent=2))
    if report["ok"]:
        print(f"{out}: {report['finished']} of {report['partitions']} partitions, {report['captioned']} captioned, "
              f"{report['skipped']} skipped; no missing or duplicate keys", file=sys.stderr)
        return 0
    print(f"{out}: problems found (see the report above)", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    from .backends.base import BackendUnavailable
    from .job import CaptionJobError, run_caption

    try:
        if args.verify:
            return _verify(args.verify)
        if args.model_config_dir:
            import open_clip

            for folder in args.model_config_dir:
                open_clip.add_model_config(folder)
        manifest = run_caption(config_from_args(args))
    except (CaptionJobError, BackendUnavailable, ValueError, FileNotFoundError) as err:
        print(f"vladva caption: error: {err}", file=sys.stderr)
        return 2
    c, r = manifest["counts"], manifest["this_run"]
    print(f"captioned {c['captioned']} rows ({c['skipped']} skipped, {c['flagged']} flagged) in "
          f"{c['shards']}/{c['shards_expected']} shards of {args.output}; this run: {r['images']} images, "
          f"{r['captions_generated']} captions, {r['tokens_generated']} tokens in {r['seconds']:.1f} s "
          f"({r['images_per_s'] or 0:.2f} img/s, {r['tokens_per_s'] or 0:.1f} tok/s)")
    return 0


def register_command(register: Callable, setup_logging: Callable[[bool], None]) -> None:
    def wrapped(args: argparse.Namespace) -> int:
        setup_logging(getattr(args, "quiet", False))
        return run(args)
    register("caption", "recaption images (folder, table, webdataset) into short/long captions vladva-train reads",
             add_arguments)(wrapped)
