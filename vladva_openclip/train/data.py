"""Training data for open_clip_train with VladVA's two captions per image.

``get_data`` has open_clip_train's contract (``get_data(args, (preprocess_train, preprocess_val), epoch,
tokenizer) -> {"train": DataInfo, "val": DataInfo, ...}``), so the trainer can bind it in place of
``open_clip_train.main.get_data``. Every batch is the 2-tuple ``(images [B,3,H,W], texts [B,2,L])``: ``texts[:, 0]``
is the short caption (contrastive), ``texts[:, 1]`` the long caption (next-token loss), both right-padded with
``tokenizer.pad_token_id`` to ``L = args.max_long_len``; a sample without a long caption has an all-pad row 1.

Dataset types (``--dataset-type``): ``csv`` (CSV/TSV table), ``webdataset`` (tar shards), ``synthetic`` (scenes of
:mod:`vladva_openclip.synth` generated on the fly), ``auto`` (by the file extension: csv/tsv, tar, or safetensors
for a packed table of :mod:`.packed`, images and caption ids made once).

Faults: a missing or corrupt image is skipped, logged with its path and counted in ``DataInfo.skips`` (a
:class:`SkipCounter` shared with the DataLoader workers); the NEXT good sample takes its place (table datasets read
row ``i+1``, ``i+2``, ... instead; webdataset streams move on), so batches always keep their full size and all
ranks stay in step. A replacement row can therefore appear twice in an epoch.

Order: table and synthetic datasets use a ``DistributedSampler(seed=args.seed)`` in every run (one replica when not
distributed) whose ``set_epoch`` open_clip's ``train_one_epoch`` already calls; webdataset streams seed every
shuffle with ``(seed, epoch, rank, worker)``. A resumed run sees the same order at the same epoch. Random
augmentations in the train transform are seeded per sample by ``(seed, epoch, sample)`` (global RNGs restored
afterwards), so a resumed run also sees the same pixels.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from open_clip_train.data import DataInfo, SharedEpoch, get_imagenet
from torch.utils.data import Dataset

from ..synth import World, WorldConfig
from ._common import (
    IMAGE_ERRORS,
    CaptionPacker,
    SkipCounter,
    TrainInputError,
    check_encoding,
    clean_caption,
    decode_error_message,
    load_rgb,
    pack_captions,
    sample_seed,
    seeded_transform,
)
from ._wds import build_wds_loader
from .loader import VladVADataInfo, _arg, _map_loader, make_packer

_logger = logging.getLogger(__name__)

__all__ = [
    "DATASET_BUILDERS",
    "CaptionPacker",
    "CaptionTableDataset",
    "SkipCounter",
    "SyntheticWorldDataset",
    "VladVADataInfo",
    "get_csv_dataset",
    "get_data",
    "get_synthetic_dataset",
    "get_wds_dataset",
    "pack_captions",
    "resolve_dataset_type",
]

MAX_CONSECUTIVE_SKIPS = 64


# ------------------------------------------------------------------------------------------------ table (CSV/TSV)

class CaptionTableDataset(Dataset):
    """Rows of a CSV/TSV table: image path, short caption, optional long caption.

    Relative image paths are resolved against the table's folder first, then against the working directory
    (open_clip's convention), so a table written next to its images works from anywhere.
    """

    def __init__(self, path: str | Path, transform: Callable, packer: CaptionPacker, skips: SkipCounter, *,
                 img_key: str = "filepath", caption_key: str = "title", long_key: str = "long_caption",
                 sep: str = "\t", max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS, seed: int = 0,
                 shared_epoch: SharedEpoch | None = None, encoding: str = "utf-8"):
        self.path = Path(path)
        # all text, and only empty cells are missing: a caption "NA" or "null" stays a caption
        try:
            df = pd.read_csv(self.path, sep=sep, dtype=str, keep_default_na=False, encoding=check_encoding(encoding))
        except UnicodeDecodeError as err:  # pandas names neither the file nor the row
            raise TrainInputError(decode_error_message(self.path, encoding) or f"{self.path}: {err}") from err
        missing = [k for k in (img_key, caption_key) if k not in df.columns]
        if missing:
            raise TrainInputError(
                f"{self.path}: column(s) {missing} not found; columns are {list(df.columns)} (read with separator "
                f"{sep!r}). Set --csv-img-key / --csv-caption-key to the image-path and short-caption columns, "
                "and --csv-separator to the file's separator"
            )
        self.images = df[img_key].tolist()
        self.shorts = [clean_caption(v) for v in df[caption_key].tolist()]
        if long_key in df.columns:
            self.longs = [clean_caption(v) for v in df[long_key].tolist()]
        else:
            _logger.warning("%s: no long-caption column %r; every sample gets an all-pad long row (no AR loss)",
                            self.path, long_key)
            self.longs = [None] * len(self.images)
        if not self.images:
            raise TrainInputError(f"{self.path}: the table has no rows")
        self.root = self.path.parent
        self.transform = transform
        self.packer = packer
        self.skips = skips
        self.max_consecutive_skips = max_consecutive_skips
        self.seed = seed
        self.shared_epoch = shared_epoch  # augmentation seeds follow (seed, epoch, row)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, idx: int) -> Path:
        p = Path(self.images[idx])
        if p.is_absolute():
            return p
        local = self.root / p
        return local if local.exists() or not p.exists() else p

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.images)
        tries = min(n, self.max_consecutive_skips)
        for attempt in range(tries):
            j = (idx + attempt) % n
            path = self.image_path(j)
            try:
                image = load_rgb(path)
            except IMAGE_ERRORS as err:
                self.skips.record(str(path), err)
                continue
            epoch = self.shared_epoch.get_value() if self.shared_epoch is not None else 0
            pixels = seeded_transform(self.transform, image, sample_seed(self.seed, epoch, idx))
            return pixels, self.packer(self.shorts[j], self.longs[j])
        raise RuntimeError(
            f"{self.path}: {tries} consecutive images failed to load (rows {idx}..{(idx + tries - 1) % n}); check "
            f"the {self.images[idx]!r}-style paths (relative ones resolve against {self.root} or the working dir)"
        )


# ------------------------------------------------------------------------------------------------ synthetic

class SyntheticWorldDataset(Dataset):
    """Scene ``i`` of a :class:`~vladva_openclip.synth.World` split, rendered on the fly (deterministic in
    ``(config.seed, split, i)``)."""

    def __init__(self, size: int, transform: Callable, packer: CaptionPacker, config: WorldConfig,
                 split: str = "train", shared_epoch: SharedEpoch | None = None):
        if size < 1:
            raise ValueError(f"synthetic dataset size must be >= 1, got {size}")
        self.size = size
        self.world = World(config)
        self.split = split
        self.transform = transform
        self.packer = packer
        self.shared_epoch = shared_epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= idx < self.size:
            raise IndexError(f"index {idx} out of range for {self.size} synthetic samples")
        s = self.world.sample(self.split, idx)
        epoch = self.shared_epoch.get_value() if self.shared_epoch is not None else 0
        seed = sample_seed(self.world.config.seed, self.split, epoch, idx)
        return seeded_transform(self.transform, self.world.render(s.scene), seed), self.packer(s.short, s.long)


# ------------------------------------------------------------------------------------------------ builders

def get_csv_dataset(args, preprocess_fn, is_train: bool, epoch: int = 0, tokenizer=None) -> VladVADataInfo:
    path = args.train_data if is_train else args.val_data
    if not path:
        raise ValueError(f"no {'--train-data' if is_train else '--val-data'} table given")
    skips = SkipCounter("train" if is_train else "val")
    dataset = CaptionTableDataset(
        path, preprocess_fn, make_packer(args, tokenizer), skips, img_key=_arg(args, "csv_img_key"),
        caption_key=_arg(args, "csv_caption_key"), long_key=_arg(args, "long_caption_key"),
        sep=_arg(args, "csv_separator"), seed=int(getattr(args, "seed", 0) or 0),
        encoding=_arg(args, "csv_encoding"),
    )
    return _map_loader(args, dataset, is_train, skips, epoch)


def get_synthetic_dataset(args, preprocess_fn, is_train: bool, epoch: int = 0, tokenizer=None) -> VladVADataInfo:
    """Train: ``args.synthetic_size`` scenes of the train split. Val: ``args.val_num_samples`` (default
    ``synthetic_size``) scenes of the test split, i.e. with held-out (colour, shape) pairs."""
    config = WorldConfig(image_size=int(_arg(args, "synthetic_image_size")), seed=int(getattr(args, "seed", 0) or 0))
    size = int(_arg(args, "synthetic_size")) if is_train else int(
        getattr(args, "val_num_samples", None) or _arg(args, "synthetic_size"))
    dataset = SyntheticWorldDataset(size, preprocess_fn, make_packer(args, tokenizer), config,
                                    split="train" if is_train else "test")
    # rendered images never fail to load; the counter is there so every DataInfo has one
    return _map_loader(args, dataset, is_train, SkipCounter("train" if is_train else "val"), epoch)


def get_wds_dataset(args, preprocess_fn, is_train: bool, epoch: int = 0, floor: bool = False,
                    tokenizer=None) -> VladVADataInfo:
    urls = args.train_data if is_train else args.val_data
    if not urls:
        raise ValueError(f"no {'--train-data' if is_train else '--val-data'} shards given")
    skips = SkipCounter("train" if is_train else "val")
    loader, shared_epoch = build_wds_loader(args, urls, preprocess_fn, make_packer(args, tokenizer), skips,
                                            is_train=is_train, epoch=epoch, floor=floor)
    return VladVADataInfo(dataloader=loader, shared_epoch=shared_epoch, skips=skips)


DATASET_BUILDERS: dict[str, Callable[..., VladVADataInfo]] = {
    "csv": get_csv_dataset,
    "webdataset": get_wds_dataset,
    "synthetic": get_synthetic_dataset,
    "packed": lambda *a, **kw: _packed_builder()(*a, **kw),
}
_EXTENSION_TYPES = {"csv": "csv", "tsv": "csv", "tar": "webdataset", "safetensors": "packed"}


def _packed_builder() -> Callable[..., VladVADataInfo]:
    from .packed import get_packed_dataset  # (packed builds on this module)

    return get_packed_dataset


def resolve_dataset_type(data_path: str | None, dataset_type: str) -> str:
    """``dataset_type`` itself, or for ``auto`` the type named by ``data_path``'s extension."""
    if dataset_type == "auto":
        ext = str(data_path or "").split("::")[0].rsplit(".", 1)[-1].lower()
        if ext not in _EXTENSION_TYPES:
            raise ValueError(
                f"--dataset-type auto cannot tell the type of {data_path!r} (extension {ext!r}); use .csv/.tsv or "
                ".tar files, or pass --dataset-type csv|webdataset|synthetic"
            )
        return _EXTENSION_TYPES[ext]
    if dataset_type not in DATASET_BUILDERS:
        raise ValueError(f"unsupported --dataset-type {dataset_type!r}; choose from {[*DATASET_BUILDERS, 'auto']}")
    return dataset_type


def get_data(args, preprocess_fns, epoch: int = 0, tokenizer=None) -> dict[str, DataInfo]:
    """open_clip_train's ``get_data`` for VladVA: ``{"train": ..., "val": ..., "imagenet-val": ..., ...}``.

    With ``--dataset-type synthetic`` the train set is generated on the fly; ``--val-data synthetic`` then adds
    a held-out-combination val set, and any other ``--val-data`` path is typed by its extension.
    """
    if tokenizer is None:
        raise ValueError("get_data needs the model's tokenizer to build the packed caption tensors")
    preprocess_train, preprocess_val = preprocess_fns
    dataset_type = getattr(args, "dataset_type", "auto") or "auto"
    data: dict[str, DataInfo] = {}
    if getattr(args, "train_data", None) or dataset_type == "synthetic":
        kind = resolve_dataset_type(args.train_data, dataset_type)
        data["train"] = DATASET_BUILDERS[kind](args, preprocess_train, is_train=True, epoch=epoch, tokenizer=tokenizer)
    val = getattr(args, "val_data", None)
    if val:
        if dataset_type == "synthetic":
            kind = "synthetic" if val == "synthetic" else resolve_dataset_type(val, "auto")
        else:
            kind = resolve_dataset_type(val, dataset_type)
        data["val"] = DATASET_BUILDERS[kind](args, preprocess_val, is_train=False, tokenizer=tokenizer)
    if getattr(args, "imagenet_val", None) is not None:
        data["imagenet-val"] = get_imagenet(args, preprocess_fns, "val")
    if getattr(args, "imagenet_v2", None) is not None:
        data["imagenet-v2"] = get_imagenet(args, preprocess_fns, "v2")
    return data
