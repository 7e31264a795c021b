"""The bag-of-words baseline: a tiny CLIP of about the tiny LLaVA's size, trained from scratch by open_clip_train.

It is not a VladVA model, so it goes through open_clip_train's OWN ``main()`` (plain CSV, short captions only, the
standard CLIP loss), on the demo's training table, with the same batch size and number of steps as the VladVA run.
Architecture (``tiny_clip.json``): ViT 2 layers x width 64 over 16x16-pixel patches (the tiny LLaVA's vision tower
sees the same 16 patches), a 2-layer width-64 causal text transformer pooled at its end-of-text token, 64-d
embeddings: ~0.39M parameters (the tiny LLaVA: 0.39M). It reads text with the tiny LLaVA's tokenizer plus an
appended ``</s>`` (CLIP pools at the end-of-text token), so both models see the same word pieces.

The config is registered with ``open_clip.add_model_config`` only while it is used (:func:`registered_config`).
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_logger = logging.getLogger(__name__)

BASELINE_NAME = "demo-tiny-clip"
CONFIG_TEMPLATE = Path(__file__).resolve().with_name("tiny_clip.json")


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """The tiny LLaVA's tokenizer with ``</s>`` appended to every text (CLIP's end-of-text pooling needs it).

    Returns:
        The directory written (loadable with ``transformers.AutoTokenizer``).
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from ..tokenizer import ASSET_TOKENIZERS

    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(ASSET_TOKENIZERS / "tiny-llava"))
    # Inside the tiny LLaVA's template a caption follows "USER: ", so its first word is a space-prefixed piece
    # ("Ġa"); a caption tokenized alone would start with the bare piece ("a") unless the space is added.
    tok.backend_tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=True)
    eos, eos_id = tok.eos_token, tok.eos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                              special_tokens=[(eos, eos_id)])
    tok.save_pretrained(str(out_dir))
    return out_dir


def write_model_config(out_dir: str | Path, tokenizer_dir: str | Path) -> Path:
    """``<out_dir>/<BASELINE_NAME>.json``: the shipped template with the tokenizer path filled in."""
    cfg = json.loads(CONFIG_TEMPLATE.read_text())
    cfg["text_cfg"]["hf_tokenizer_name"] = str(Path(tokenizer_dir).resolve())
    out = Path(out_dir) / f"{BASELINE_NAME}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


@contextlib.contextmanager
def registered_config(config_file: str | Path) -> Iterator[str]:
    """Register one model config file with open_clip for the duration of the block; yields the model name."""
    from open_clip import factory

    config_file = Path(config_file)
    name = config_file.stem
    if name in factory._MODEL_CONFIGS:
        raise ValueError(f"an open_clip model named {name!r} is already registered")
    open_clip_add = factory.add_model_config
    open_clip_add(config_file)
    try:
        yield name
    finally:
        # open_clip has no removal API: drop what add_model_config added (a later rescan would bring it back).
        if config_file in factory._MODEL_CONFIG_PATHS:
            factory._MODEL_CONFIG_PATHS.remove(config_file)
        factory._MODEL_CONFIGS.pop(name, None)


@dataclass
class TrainSettings:
    """What both trainers share in the demo (same data, same budget)."""

    batch_size: int = 64
    epochs: int = 4
    lr: float = 1e-3
    warmup: int = 10
    wd: float = 0.05
    seed: int = 0
    workers: int = 0
    log_every: int = 10


def absolute_table(table: str | Path, out: str | Path, img_key: str = "filepath", sep: str = "\t") -> Path:
    """A copy of a training table with absolute image paths (open_clip's CsvDataset opens paths as given,
    relative to the working directory)."""
    import pandas as pd

    table = Path(table)
    df = pd.read_csv(table, sep=sep, dtype=str, keep_default_na=False)
    df[img_key] = [str(p) if Path(p).is_absolute() else str((table.parent / p).resolve()) for p in df[img_key]]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, sep=sep, index=False)
    return out


def train_clip(table: str | Path, logs: str | Path, name: str, settings: TrainSettings, model_name: str,
               caption_key: str = "short_caption", img_key: str = "filepath", sep: str = "\t") -> Path:
    """Train ``model_name`` (a registered open_clip config) with open_clip_train's own main; returns the last
    checkpoint. ``logs/name`` is replaced if it exists."""
    import open_clip_train.main as ocm

    from ..train.main import restored_root_logging
    from .runs import run_to_final_checkpoint

    argv = [
        "--model", model_name, "--train-data", str(table), "--dataset-type", "csv", "--csv-img-key", img_key,
        "--csv-caption-key", caption_key, "--csv-separator", sep, "--batch-size", str(settings.batch_size),
        "--epochs", str(settings.epochs), "--lr", str(settings.lr), "--warmup", str(settings.warmup),
        "--wd", str(settings.wd), "--workers", str(settings.workers), "--precision", "fp32",
        "--logs", str(logs), "--name", name, "--report-to", "", "--seed", str(settings.seed),
        "--log-every-n-steps", str(settings.log_every), "--save-frequency", str(settings.epochs),
    ]
    with restored_root_logging():
        return run_to_final_checkpoint(ocm.main, argv, logs, name, settings.epochs,
                                       f"open_clip_train for {model_name}")


@contextlib.contextmanager
def tensor_train_data(pixels: torch.Tensor, tokens: torch.Tensor, seed: int) -> Iterator[None]:
    """open_clip_train's ``get_data`` serves ``(pixels[i], tokens[i])`` for the duration of the block.

    The images are already preprocessed and the captions already tokenized (once, for the whole run), so the CLIP's
    steps spend no time decoding images or tokenizing. Order: a seeded sampler (as open_clip_train's distributed
    one) with every full batch per epoch.
    """
    import open_clip_train.main as ocm
    from open_clip_train.data import DataInfo
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    if len(pixels) != len(tokens):
        raise ValueError(f"{len(pixels)} images but {len(tokens)} token rows")

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        dataset = TensorDataset(pixels, tokens)
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=0)
        loader.num_samples, loader.num_batches = len(dataset), len(loader)
        return {"train": DataInfo(loader, sampler)}

    original = ocm.get_data
    ocm.get_data = get_data
    try:
        yield
    finally:
        ocm.get_data = original


def train_clip_on_tensors(images: torch.Tensor, captions: list[str], pixels: torch.Tensor | None, logs: str | Path,
                          name: str, settings: TrainSettings, model_name: str) -> Path:
    """:func:`train_clip` on in-memory data: uint8 ``images [N, 3, S, S]`` and their captions. ``pixels`` (the
    images preprocessed by another model, e.g. the VladVA model's) are used when the CLIP's own deterministic
    transform is the same one (same pixels for both trainers), else the images are preprocessed here. No
    augmentation: like the VladVA fine-tuning, the CLIP sees each image as its val transform makes it."""
    import open_clip
    from PIL import Image

    _, _, preprocess = open_clip.create_model_and_transforms(model_name)
    probe = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    if pixels is None or not torch.equal(preprocess(probe), pixels[0]):
        pixels = torch.stack([preprocess(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images])
    tokens = open_clip.get_tokenizer(model_name)(list(captions))
    with tensor_train_data(pixels, tokens, settings.seed):
        # --train-data only has to be set for open_clip_train to train; the rebound get_data serves the tensors
        return train_clip(f"<{len(captions)} in-memory scenes>", logs, name, settings, model_name)


def load_clip(model_name: str, checkpoint: str | Path, device: str = "cpu"):
    """(model in eval mode, val preprocess, tokenizer) of a trained baseline; the config must be registered."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint),
                                                                 device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def count_clip_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
