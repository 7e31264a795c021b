"""What every training-data builder shares: the VladVA flags' defaults, the DataInfo with its skip counter, the
caption packer and the map-style DataLoader. A floor below :mod:`.data` and :mod:`.packed`, so that the packed-table
builder does not import the module that dispatches to it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from open_clip_train.data import DataInfo, SharedEpoch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ._common import CaptionPacker, SkipCounter

_logger = logging.getLogger(__name__)

# Defaults of the flags VladVA's trainer adds; getattr with these keeps plain open_clip namespaces working.
ARG_DEFAULTS = {
    "long_caption_key": "long_caption",
    "wds_caption_key": "txt",
    "wds_long_caption_key": "long.txt",
    "max_short_len": 32,
    "max_long_len": 128,
    "synthetic_size": 256,
    "synthetic_image_size": 64,
    "csv_img_key": "filepath",
    "csv_caption_key": "title",
    "csv_separator": "\t",
    "csv_encoding": "utf-8",
}

def _arg(args, name: str):
    value = getattr(args, name, None)
    return ARG_DEFAULTS.get(name) if value is None else value


@dataclass
class VladVADataInfo(DataInfo):
    """open_clip's DataInfo plus ``skips``: the running count of skipped samples (``skips.value``)."""

    skips: SkipCounter | None = None

    def skip_report(self) -> int:
        """Log how many samples have been skipped so far (bad images); returns that count."""
        total = self.skips.value if self.skips is not None else 0
        if total:
            _logger.warning("%s data: %d samples skipped so far (missing or corrupt images; see earlier warnings)",
                            self.skips.name, total)
        return total


def make_packer(args, tokenizer) -> CaptionPacker:
    return CaptionPacker(tokenizer, int(_arg(args, "max_short_len")), int(_arg(args, "max_long_len")),
                         pair_text=bool(getattr(args, "text_pairs", False)))



def _map_loader(args, dataset: Dataset, is_train: bool, skips: SkipCounter, epoch: int) -> VladVADataInfo:
    """DataLoader with a seeded DistributedSampler for training (one replica when not distributed), and a
    SharedEpoch that the dataset reads to seed each sample's augmentation."""
    sampler = None
    shared_epoch = SharedEpoch(epoch) if is_train else None
    dataset.shared_epoch = shared_epoch
    if is_train:
        world_size = int(getattr(args, "world_size", 1) or 1) if getattr(args, "distributed", False) else 1
        rank = int(getattr(args, "rank", 0) or 0) if world_size > 1 else 0
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=int(getattr(args, "seed", 0) or 0), drop_last=True)
        sampler.set_epoch(epoch)
    loader = DataLoader(
        dataset, batch_size=int(args.batch_size), shuffle=False, sampler=sampler,
        num_workers=int(getattr(args, "workers", 0) or 0), pin_memory=torch.cuda.is_available(), drop_last=is_train,
    )
    loader.num_samples = len(dataset)
    loader.num_batches = len(loader)
    if is_train and loader.num_batches == 0:
        raise ValueError(
            f"{len(dataset)} training samples make no full batch of {args.batch_size} per rank; lower --batch-size"
        )
    return VladVADataInfo(dataloader=loader, sampler=sampler, shared_epoch=shared_epoch, skips=skips)
