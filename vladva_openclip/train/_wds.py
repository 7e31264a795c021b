"""Webdataset training/validation data with packed short + long captions.

Same shape as open_clip_train's ``get_wds_dataset`` (shard list with brace expansion and ``::`` sources, shard
shuffle, split by rank then by worker, sample shuffle buffer, batching inside the workers, ``with_epoch``-style
fixed batch count, optional resampling with upsampling weights), written as one IterableDataset so that every
random choice is seeded explicitly by ``(seed, epoch, rank, worker, pass)``:

- not resampled: all ranks and workers shuffle the shard list with the same ``(seed, epoch)`` rng, then global
  worker ``g = rank * workers + worker_id`` takes shards ``g, g + W, ...`` (``W = world_size * workers``);
- resampled: each worker draws shards with replacement from its own ``(seed, epoch, rank, worker)`` rng;
- the sample shuffle buffer of each worker is seeded the same way.

So a run resumed at epoch ``e`` with the same seed, world size and worker count sees the same batches.
A sample whose image is missing or cannot be decoded is skipped, counted in the :class:`SkipCounter` and
logged with ``<shard url>:<key>``; the next good sample takes its place, so every training batch stays full.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator

import torch
from open_clip_train.data import SharedEpoch, expand_urls, tarfile_to_samples_nothrow
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ._common import (
    IMAGE_ERRORS,
    CaptionPacker,
    SkipCounter,
    TrainInputError,
    clean_caption,
    load_rgb,
    sample_seed,
    seeded_transform,
)

_logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
SAMPLE_SHUFFLE_SIZE = 5000  # open_clip's buffer sizes (raw samples, before decoding)
SAMPLE_SHUFFLE_INITIAL = 1000
MAX_EMPTY_PASSES = 3


class WdsSampleProcessor:
    """Raw webdataset sample dict -> ``(image [3,H,W], texts [2,L])``, or None (counted) when it is unusable."""

    def __init__(self, transform: Callable, packer: CaptionPacker, skips: SkipCounter, short_key: str = "txt",
                 long_key: str = "long.txt", image_keys: tuple[str, ...] = IMAGE_KEYS, seed: int = 0):
        self.transform = transform
        self.packer = packer
        self.skips = skips
        self.short_key = short_key
        self.long_key = long_key
        self.image_keys = image_keys
        self.seed = seed

    def __call__(self, sample: dict, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The augmentation of a sample is seeded by (seed, epoch, shard url, key): independent of read order."""
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        img_key = next((k for k in self.image_keys if k in sample), None)
        if img_key is None:
            self.skips.record(where, f"no image (looked for {'/'.join(self.image_keys)})")
            return None
        try:
            short = clean_caption(sample.get(self.short_key))
            long = clean_caption(sample.get(self.long_key))
        except UnicodeDecodeError as err:  # webdataset text members are UTF-8; say which sample is not
            self.skips.record(where, f"caption is not UTF-8 text ({err.reason} at byte {err.start}); re-encode "
                                     "the shard's text files as UTF-8")
            return None
        if short is None:
            self.skips.record(where, f"no short caption {self.short_key!r}")
            return None
        try:
            image = load_rgb(sample[img_key])
        except IMAGE_ERRORS as err:
            self.skips.record(where, err)
            return None
        pixels = seeded_transform(self.transform, image,
                                  sample_seed(self.seed, epoch, sample.get("__url__"), sample.get("__key__")))
        return pixels, self.packer(short, long)


def _shuffled(items: Iterator, rng: random.Random, bufsize: int, initial: int) -> Iterator:
    """Buffered shuffle (webdataset's algorithm, with an explicit rng)."""
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) < bufsize:
            nxt = next(items, None)
            if nxt is not None:
                buf.append(nxt)
        if len(buf) >= initial:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x[0] for x in items]), torch.stack([x[1] for x in items])


class PackedWebDataset(IterableDataset):
    """Batches ``(images [B,3,H,W], texts [B,2,L])`` from webdataset shards (see the module docstring)."""

    def __init__(self, urls: list[str], process: WdsSampleProcessor, *, batch_size: int, is_train: bool, seed: int,
                 shared_epoch: SharedEpoch, rank: int = 0, world_size: int = 1, resampled: bool = False,
                 weights: list[float] | None = None, worker_batches: int | None = None, num_workers: int = 0,
                 shuffle_size: int = SAMPLE_SHUFFLE_SIZE, shuffle_initial: int = SAMPLE_SHUFFLE_INITIAL):
        super().__init__()
        if not urls:
            raise ValueError("no webdataset shards given")
        self.urls = list(urls)
        self.weights = weights
        self.process = process
        self.batch_size = batch_size
        self.is_train = is_train
        self.seed = seed
        self.shared_epoch = shared_epoch
        self.rank = rank
        self.world_size = world_size
        self.resampled = resampled
        self.worker_batches = worker_batches
        self.num_workers = max(1, num_workers)  # DataLoader workers (0 -> the main process, counted as 1)
        self.shuffle_size = shuffle_size
        self.shuffle_initial = shuffle_initial

    def _rng(self, epoch: int, worker: int, pass_idx: int, what: str) -> random.Random:
        return random.Random(f"vladva-wds/{self.seed}/{epoch}/{self.rank}/{worker}/{pass_idx}/{what}")

    def shards_for(self, epoch: int, worker: int, num_workers: int, pass_idx: int = 0) -> list[str]:
        """The shards worker ``worker`` of this rank reads in pass ``pass_idx`` of ``epoch``."""
        if not self.is_train:
            return self.urls[worker::num_workers]
        if self.resampled:
            rng = self._rng(epoch, worker, pass_idx, "shards")
            return [rng.choices(self.urls, weights=self.weights, k=1)[0] for _ in range(len(self.urls))]
        order = list(self.urls)
        # same rng on every rank and worker, so the split below is a partition
        random.Random(f"vladva-wds/{self.seed}/{epoch}/{pass_idx}/shard-order").shuffle(order)
        total = self.world_size * num_workers
        return order[self.rank * num_workers + worker::total]

    def _samples(self, shards: list[str]) -> Iterator[dict]:
        def handler(exn: BaseException) -> bool:  # a broken tar stream: count it, keep going
            self.process.skips.record("<tar stream>", exn)
            return True
        return iter(tarfile_to_samples_nothrow([{"url": u} for u in shards], handler=handler))

    def _batches(self, epoch: int, worker: int, num_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batch: list = []
        empty_passes = 0
        for pass_idx in itertools.count():
            shards = self.shards_for(epoch, worker, num_workers, pass_idx)
            samples = self._samples(shards)
            if self.is_train:
                samples = _shuffled(samples, self._rng(epoch, worker, pass_idx, "samples"), self.shuffle_size,
                                    self.shuffle_initial)
            good = 0
            for raw in samples:
                item = self.process(raw, epoch)
                if item is None:
                    continue
                good += 1
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield _collate(batch)
                    batch = []
            if not self.is_train:
                if batch:
                    yield _collate(batch)
                return
            empty_passes = 0 if good else empty_passes + 1
            # training repeats passes; with no usable sample it would spin forever (resampling may draw only bad
            # shards once by chance, hence a few tries)
            if empty_passes >= (MAX_EMPTY_PASSES if self.resampled else 1):
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: no usable sample in shards {shards[:4]}"
                    f"{'...' if len(shards) > 4 else ''}; check the shard paths and contents"
                )
            # a partial batch carries over into the next pass, so training batches are always full

    def __len__(self) -> int:
        """Batches per epoch of this rank (training only; the stream length of a val set is not known)."""
        if self.worker_batches is None:
            raise TypeError("the number of validation batches is not known in advance")
        info = get_worker_info()
        return self.worker_batches * (info.num_workers if info is not None else self.num_workers)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self._batches(self.shared_epoch.get_value(), worker, num_workers)
        if self.worker_batches is not None:
            batches = itertools.islice(batches, self.worker_batches)
        return batches


def count_samples(urls: list[str], flag: str) -> int:
    """Samples in the shards ``urls``, from the ``sizes.json`` (shard file name -> count) in each shard's folder.

    Sources in different folders (``a/{0..9}.tar::b/{0..4}.tar``) are counted folder by folder. A folder without
    ``sizes.json`` may hold a ``__len__`` file (open_clip's total for the folder) when all its shards are used.
    Anything else raises :class:`TrainInputError` naming the folder and what to pass.
    """
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(os.path.dirname(url), []).append(os.path.basename(url))
    total = 0
    for folder, names in by_folder.items():
        where = folder or "."
        sizes_path, len_path = os.path.join(where, "sizes.json"), os.path.join(where, "__len__")
        if os.path.isfile(sizes_path):
            try:
                with open(sizes_path, encoding="utf-8") as f:
                    sizes = json.load(f)
            except (OSError, ValueError) as err:
                raise TrainInputError(f"{sizes_path} is not a JSON object of shard name -> sample count ({err}); "
                                      f"fix it or pass {flag}") from err
            missing = [n for n in names if n not in sizes]
            if missing:
                raise TrainInputError(
                    f"{sizes_path} has no count for {len(missing)} shard(s) ({', '.join(missing[:3])}"
                    f"{', ...' if len(missing) > 3 else ''}): add them, or pass {flag} (the total over all sources)")
            total += sum(int(sizes[n]) for n in names)
        elif os.path.isfile(len_path) and len(by_folder) == 1:
            import ast

            with open(len_path, encoding="utf-8") as f:
                total += int(ast.literal_eval(f.read().strip()))
        else:
            raise TrainInputError(
                f"number of samples unknown for the shards in {where!r}: pass {flag} (the total over all "
                f"sources), or write {os.path.join(where, 'sizes.json')} mapping each shard file name to its "
                "sample count")
    return total


def build_wds_loader(args, urls_spec: str, transform: Callable, packer: CaptionPacker, skips: SkipCounter, *,
                     is_train: bool, epoch: int = 0, floor: bool = False):
    """A DataLoader over :class:`PackedWebDataset` with ``num_batches``/``num_samples`` attached, and its
    SharedEpoch. Mirrors open_clip_train's sample/batch accounting."""
    resampled = bool(getattr(args, "dataset_resampled", False)) and is_train
    upsampling = getattr(args, "train_data_upsampling_factors", None) if is_train else None
    if upsampling is not None and not resampled:
        raise ValueError("--train-data-upsampling-factors needs --dataset-resampled (sampling with replacement)")
    urls, weights = expand_urls(urls_spec, upsampling)
    workers = int(getattr(args, "workers", 0) or 0)
    world_size = int(getattr(args, "world_size", 1) or 1)
    batch_size = int(args.batch_size)
    if is_train:
        num_samples = getattr(args, "train_num_samples", None) or count_samples(urls, "--train-num-samples")
        if not resampled and len(urls) < max(1, workers) * world_size:
            raise ValueError(
                f"{len(urls)} shards cannot feed {max(1, workers)} workers x {world_size} ranks (each needs >= 1 "
                "shard); write more, smaller shards, lower --workers, or use --dataset-resampled"
            )
        round_fn = math.floor if floor else math.ceil
        global_batch = batch_size * world_size
        num_worker_batches = max(1, round_fn(round_fn(num_samples / global_batch) / max(1, workers)))
        num_batches = num_worker_batches * max(1, workers)
        num_samples = num_batches * global_batch
    else:
        num_samples = getattr(args, "val_num_samples", None)
        if not num_samples:
            try:
                num_samples = count_samples(urls, "--val-num-samples")
            except TrainInputError:
                num_samples = 0  # as open_clip_train: an unknown validation size is not an error
        num_batches = math.ceil(num_samples / batch_size)
        num_worker_batches = None
    shared_epoch = SharedEpoch(epoch=epoch)
    seed = int(getattr(args, "seed", 0) or 0)
    dataset = PackedWebDataset(
        urls, WdsSampleProcessor(transform, packer, skips, short_key=getattr(args, "wds_caption_key", "txt") or "txt",
                                 long_key=getattr(args, "wds_long_caption_key", "long.txt") or "long.txt", seed=seed),
        batch_size=batch_size, is_train=is_train, seed=seed, shared_epoch=shared_epoch,
        rank=int(getattr(args, "rank", 0) or 0) if is_train else 0, world_size=world_size if is_train else 1,
        resampled=resampled, weights=weights, worker_batches=num_worker_batches, num_workers=workers,
    )
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    loader.num_batches = num_batches
    loader.num_samples = num_samples
    return loader, shared_epoch
