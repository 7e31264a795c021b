"""The ``vladva`` command: subcommands registered by name (``vladva demo``, ``vladva pretrain-captioner``, ...).

Training and evaluation have their own commands (``vladva-train``, ``vladva-eval``); ``vladva train`` and
``vladva eval`` forward to them.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cli_logging import setup_cli_logging


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    passthrough: bool = False  # the remaining argv goes to the command untouched


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
             passthrough: bool = False) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable[[argparse.Namespace], int | None]) -> Callable:
        if name in COMMANDS:
            raise ValueError(f"vladva subcommand {name!r} is already registered")
        COMMANDS[name] = Command(help, add_arguments or (lambda p: None), fn, passthrough)
        return fn
    return wrap


# ---- demo ----------------------------------------------------------------------------------------------------
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from .demo.pipeline import PRESETS, DemoConfig
    from .demo.variants import TABLE4

    d = DemoConfig()
    p.add_argument("--out", type=Path, default=d.out, help=f"output directory (default: {d.out})")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="budget: default (about 3 min on 2 cores), fast (about 1 min), test (seconds; smoke test)")
    p.add_argument("--fast", dest="preset", action="store_const", const="fast", help="same as --preset fast")
    for name, kind, what in (
        ("n_train", int, "training scenes"), ("n_test", int, "test scenes of every evaluation set"),
        ("epochs", int, "epochs of both trainers"), ("batch_size", int, "batch size of both trainers"),
        ("lr", float, "VladVA learning rate"), ("clip_lr", float, "CLIP baseline learning rate"),
        ("warmup", int, "warmup steps"), ("seed", int, "training seed"), ("world_seed", int, "world seed"),
        ("threads", int, "torch CPU threads (the numbers are identical across runs for the same count)"),
    ):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                       help=f"{what} (default: the preset's; default preset: {getattr(d, name)})")
    p.add_argument("--variant", choices=list(TABLE4)[1:], default=None,
                   help="which VladVA configuration to fine-tune (default: vladva = LoRA + soft prompts + AR loss)")
    p.add_argument("--pretrained", default=None, help=f"base to fine-tune (default: {d.pretrained})")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", default=None,
                   help="skip the CLIP baseline")
    p.add_argument("--no-e5v", dest="e5v", action="store_false", default=None,
                   help="skip the E5-V-style baseline (text-only contrastive fine-tuning on paraphrase pairs)")
    p.add_argument("--generative", dest="generative", action=argparse.BooleanOptionalAction, default=None,
                   help="also score the pair tasks by the captioner's and the VladVA model's own likelihood")
    p.add_argument("--short-captions", choices=("coarse", "detailed"), default=None,
                   help=f"the world's training short captions (default: {d.short_captions}: part of the scene)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--quiet", action="store_true", help="only warnings and the final table")


@register("demo", "the embedded default: captioner -> VladVA fine-tuning -> evaluation, beside a CLIP baseline",
          _demo_arguments)
def _demo(args: argparse.Namespace) -> int:
    from .demo.pipeline import preset, run_demo

    setup_cli_logging(args.quiet)
    keys = ("out", "n_train", "n_test", "epochs", "batch_size", "lr", "clip_lr", "warmup", "seed", "world_seed",
            "threads", "variant", "pretrained", "baseline", "e5v", "generative", "short_captions", "progress")
    cfg = preset(args.preset, **{k: getattr(args, k) for k in keys if getattr(args, k) is not None})
    announce = (lambda msg: None) if args.quiet else (lambda msg: print(f"\n== {msg}", flush=True))
    result = run_demo(cfg, announce=announce)
    print(f"\nVladVA demo ({cfg.steps} training steps x batch {cfg.batch_size}, {cfg.n_test} test scenes; "
          f"{result.seconds['total']:.0f} s)\n")
    print(result.table.to_markdown())
    if result.losses:
        print("\nVladVA training losses on 64 fixed training samples, before -> after fine-tuning: " + ", ".join(
            f"{k} {result.losses['before'].get(k, float('nan')):.3f} -> {v:.3f}"
            for k, v in result.losses.get("after", {}).items()))
    print("\nwritten: " + ", ".join(result.files.values()))
    return 0


# ---- pretrain-captioner ------------------------------------------------------------------------------------
@register("pretrain-captioner", "reproduce the shipped tiny captioner (generative pretraining on the world)",
          passthrough=True)
def _pretrain(args: argparse.Namespace) -> int:
    from .demo.pretrain_captioner import main as pretrain_main

    pretrain_main(args.rest)
    return 0


# ---- forwarding to the other commands ----------------------------------------------------------------------
@register("train", "vladva-train (open_clip_train's main with VladVA's flags)", passthrough=True)
def _train(args: argparse.Namespace) -> int | None:
    from .train.main import main as train_main

    return train_main(args.rest)


@register("eval", "vladva-eval (benchmarks, several models side by side)", passthrough=True)
def _eval(args: argparse.Namespace) -> int | None:
    from .eval.cli import main as eval_main

    return eval_main(args.rest)


@register("analyze", "the paper's analyses: prompt search, next tokens, attention maps, caption retention",
          passthrough=True)
def _analyze(args: argparse.Namespace) -> int | None:
    from .analysis.cli import main as analyze_main

    return analyze_main(args.rest)


# ---- plan ----------------------------------------------------------------------------------------------------
def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a registered vladva-* model name (built on the meta device: no weights needed)")
    p.add_argument("--batch-size", type=int, default=32, help="per-GPU micro-batch, as vladva-train's (default 32)")
    p.add_argument("--max-short-len", type=int, default=None, help="short-caption tokens (default: the model's)")
    p.add_argument("--max-long-len", type=int, default=None, help="long-caption tokens (default: the model's)")
    p.add_argument("--precision", default="amp_bf16", help="as vladva-train's --precision (default amp_bf16)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--accum-freq", type=int, default=1)
    p.add_argument("--world-size", type=int, default=1, help="GPUs (the plan is per GPU)")
    p.add_argument("--no-ar", dest="ar", action="store_false", help="plan without the long-caption pass "
                                                                    "(--ar-weight 0 or --text-pairs)")
    p.add_argument("--gpu-memory", default=None, help="e.g. 80GB: say whether it fits, and the largest per-GPU "
                                                      "batch that does")
    p.add_argument("--base-model", default=None, help="local base directory (its config.json is the architecture)")
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


@register("plan", "memory per GPU of a training run, and the largest batch that fits, before it starts",
          _plan_arguments)
def _plan(args: argparse.Namespace) -> int:
    import json
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # only configs and tokenizers are read; never wait on the network
    setup_cli_logging(True)
    from .plan import plan
    from .registry import is_vladva_name, list_vladva_models

    if not is_vladva_name(args.model):
        print(f"vladva plan: error: {args.model!r} is not a registered VladVA model; choose from "
              f"{', '.join(list_vladva_models())}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("base_model", args.base_model), ("lora_r", args.lora_r)) if v is not None}
    try:
        result = plan(args.model, args.batch_size, max_short_len=args.max_short_len, max_long_len=args.max_long_len,
                      precision=args.precision, grad_checkpointing=args.grad_checkpointing,
                      accum_freq=args.accum_freq, world_size=args.world_size, ar=args.ar,
                      gpu_memory=args.gpu_memory, **overrides)
    except ValueError as err:
        print(f"vladva plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.render())
    return 0


# ---- embed / index / search (vladva_openclip.retrieval) -----------------------------------------------------
def _register_retrieval() -> None:
    from .retrieval.cli import register_commands

    register_commands(register, setup_cli_logging)


_register_retrieval()


# ---- caption (vladva_openclip.caption) ----------------------------------------------------------------------
def _register_caption() -> None:
    from .caption.cli import register_command

    register_command(register, setup_cli_logging)


_register_caption()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vladva", description="VladVA: the demo, the captioner's pretraining, and shortcuts to vladva-train and vladva-eval.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].passthrough:
        # Forwarded verbatim (argparse would try to read the other command's flags, --help included).
        return int(COMMANDS[argv[0]].run(argparse.Namespace(command=argv[0], rest=argv[1:])) or 0)
    args = build_parser().parse_args(argv)
    rc = COMMANDS[args.command].run(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
