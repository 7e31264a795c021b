"""The VladVA flags, parsed beside open_clip_train's own (which rejects unknown flags)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from ..config import PROMPT_MODES


@dataclass(frozen=True)
class Flag:
    name: str
    kwargs: dict[str, Any]
    model_kwarg: str | None = None  # create_model keyword this flag feeds (None: trainer-only)


FLAGS: tuple[Flag, ...] = (
    Flag("--ar-weight", dict(type=float, default=1.0, help="weight of the next-token loss on long captions "
                                                           "(paper: 1.0, the losses are summed); 0 disables it")),
    Flag("--contrastive-weight", dict(type=float, default=1.0, help="weight of the contrastive loss")),
    Flag("--text-pairs", dict(action="store_true", help="E5-V-style text-only training: the contrastive loss pairs "
                                                        "the short caption with the second caption column (e.g. a "
                                                        "paraphrase), both through the text tower; images unused")),
    Flag("--lora-r", dict(type=int, default=None, help="LoRA rank (default: the model config's, 16 for real models)"),
         "lora_r"),
    Flag("--lora-alpha", dict(type=int, default=None, help="LoRA alpha (default: the model config's)"), "lora_alpha"),
    Flag("--lora-dropout", dict(type=float, default=None, help="LoRA dropout (default: 0)"), "lora_dropout"),
    Flag("--no-lora", dict(action="store_true", help="train the soft prompts (and logit_scale) only")),
    Flag("--image-prompt", dict(type=str, default=None, help="handcrafted image prompt"), "image_prompt"),
    Flag("--text-prompt", dict(type=str, default=None, help="handcrafted text prompt"), "text_prompt"),
    Flag("--image-prompt-mode", dict(choices=PROMPT_MODES, default=None,
                                     help="handcrafted | soft (learnable, initialised from the handcrafted "
                                          "prompt) | both"), "image_prompt_mode"),
    Flag("--text-prompt-mode", dict(choices=PROMPT_MODES, default=None, help="as --image-prompt-mode"),
         "text_prompt_mode"),
    Flag("--soft-prompt-lr-scale", dict(type=float, default=1.0, help="soft prompts learn at lr * this")),
    Flag("--max-short-len", dict(type=int, default=None, help="short-caption tokens kept for the contrastive loss "
                                                              "(default: the model's; real models 32)")),
    Flag("--max-long-len", dict(type=int, default=None, help="long-caption tokens kept for the AR loss, EOS included "
                                                             "(default: the model's; real models 500, as the paper)")),
    Flag("--long-caption-key", dict(type=str, default="long_caption", help="CSV column of the long caption")),
    Flag("--csv-encoding", dict(type=str, default="utf-8", help="text encoding of --train-data/--val-data CSV/TSV "
                                                                "tables (e.g. latin-1, cp1252, utf-8-sig)")),
    Flag("--wds-caption-key", dict(type=str, default="txt", help="webdataset key of the short caption")),
    Flag("--wds-long-caption-key", dict(type=str, default="long.txt", help="webdataset key of the long caption")),
    Flag("--synthetic-size", dict(type=int, default=256, help="samples per epoch with --dataset-type synthetic")),
    Flag("--synthetic-image-size", dict(type=int, default=64, help="rendered side of synthetic scenes")),
    Flag("--base-model", dict(type=str, default=None, help="local directory (or HF id) of the base LVLM weights"),
         "base_model"),
    Flag("--save-every-n-steps", dict(type=int, default=0, help="also checkpoint every N optimizer steps inside an "
                                                                "epoch (resume loses at most N steps)")),
    Flag("--progress", dict(action="store_true", help="a progress bar per epoch (rank 0) besides the log lines")),
    Flag("--max-nonfinite-steps", dict(type=int, default=5, help="stop after this many non-finite losses in a row "
                                                                 "(each one skips its step)")),
)


def vladva_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("VladVA")
    for flag in FLAGS:
        group.add_argument(flag.name, **flag.kwargs)
    return parser


def split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(VladVA namespace, the remaining argv for open_clip_train's parser)."""
    return vladva_parser().parse_known_args(argv)


def model_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    """create_model keywords from the VladVA flags that were set."""
    out = {}
    for flag in FLAGS:
        dest = flag.name.lstrip("-").replace("-", "_")
        value = getattr(ns, dest, None)
        if flag.model_kwarg and value is not None:
            out[flag.model_kwarg] = value
    if getattr(ns, "no_lora", False):
        out["use_lora"] = False
    return out
