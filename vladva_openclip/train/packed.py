"""Packed training tables: images and packed caption ids in one safetensors file, made once, read every epoch.

Decoding an image, preprocessing it and tokenizing two captions costs about as much per sample as a tiny model's
training step; a packed table does that work once, when it is written (:func:`write_packed_table`), and the
trainer reads it like any table: ``vladva-train --train-data world.safetensors`` (``--dataset-type auto`` picks
this reader by the extension).

File layout (safetensors):

- ``texts``: int64 ``[N, 2, L]``, exactly what :class:`~._common.CaptionPacker` makes of each sample (row 0 the
  short caption, row 1 the long caption, or with ``--text-pairs`` the second text of the pair), ``L`` =
  ``max_long_len``;
- ``images``: uint8 ``[N, 3, H, W]``;
- metadata: ``format``, ``packing`` (a fingerprint of tokenizer, lengths and pair mode), ``n`` and optionally
  ``preprocess``: the ``repr`` of a deterministic transform the table is meant for. The reader then checks that its
  transform is that one and preprocesses every image once, when the table is opened (no per-sample work while
  training); without it, the trainer's transform is applied per sample (augmentations included, seeded per sample
  and epoch as for every table).

A table made with another tokenizer, other lengths, the other pair mode or another preprocessing is refused with a
message naming what differs, never read wrongly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .._fs import save_safetensors, write_atomically
from ..progress import progress as tqdm
from ._common import CaptionPacker, SkipCounter, TrainInputError, sample_seed, seeded_transform
from .loader import _map_loader, make_packer

_logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "PackedTableDataset", "get_packed_dataset", "packing_fingerprint", "write_packed_table"]

FORMAT = "vladva-packed-v1"
# Captions whose packing identifies the tokenizer, the lengths and the pair mode (row 1 is tokenized differently
# for long captions and for text pairs).
_PROBE = ("a small red circle to the left of a blue square",
          "The image shows two objects on a white background. In the center, there is a large green star.")


def packing_fingerprint(packer: CaptionPacker) -> str:
    """What decides the ids of a packed sample: the packer's output on probe captions, its lengths, its mode."""
    ids = packer(*_PROBE)
    digest = hashlib.blake2b(ids.numpy().tobytes(), digest_size=8).hexdigest()
    return json.dumps({"short": packer.max_short_len, "long": packer.max_long_len, "pad": packer.pad_id,
                       "pair_text": bool(getattr(packer, "pair_text", False)), "ids": digest}, sort_keys=True)


def write_packed_table(path: str | os.PathLike, images: torch.Tensor, shorts: Sequence[str],
                       longs: Sequence[str | None], packer: CaptionPacker, preprocess: Callable | None = None,
                       progress: bool = False) -> Path:
    """Write a packed table (atomically).

    Args:
        images: uint8 ``[N, 3, H, W]``.
        shorts, longs: N captions each (a None or empty long caption packs an all-pad row: no AR loss).
        packer: the trainer's packer for the model (``CaptionPacker(tokenizer, max_short_len, max_long_len)``).
        preprocess: if given, the table declares this deterministic transform (no augmentation) as the one to
            train with; the trainer must use exactly it and preprocesses each image once. None: any transform,
            applied per sample.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if not len(shorts) == len(longs) == images.shape[0]:
        raise ValueError(f"{images.shape[0]} images, {len(shorts)} short and {len(longs)} long captions")
    if images.shape[0] == 0:
        raise ValueError("a packed table needs at least one sample")
    texts = torch.stack([packer(s, lc) for s, lc in tqdm(zip(shorts, longs), total=len(shorts), desc="pack captions",
                                                          disable=not progress, leave=False)])
    meta = {"format": FORMAT, "packing": packing_fingerprint(packer), "n": str(images.shape[0])}
    tensors = {"texts": texts, "images": images.contiguous()}
    if preprocess is not None:
        meta["preprocess"] = repr(preprocess)
    return write_atomically(path, lambda tmp: save_safetensors(tensors, tmp, metadata=meta))


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


class PackedTableDataset(Dataset):
    """The samples of a packed table: ``(pixels [3, S, S], texts [2, L])``.

    Raises:
        TrainInputError: not a packed table, or packed for another tokenizer / lengths / pair mode /
            preprocessing than ``packer`` and ``transform``.
    """

    def __init__(self, path: str | os.PathLike, transform: Callable, packer: CaptionPacker, seed: int = 0,
                 shared_epoch=None):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise TrainInputError(f"{self.path}: no such packed table")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise TrainInputError(f"{self.path} is not a packed table (format {meta.get('format')!r}, "
                                          f"expected {FORMAT!r}); write it with vladva_openclip.train.packed."
                                          "write_packed_table")
                self.texts = f.get_tensor("texts")
                self.images = f.get_tensor("images")
        except TrainInputError:
            raise
        except Exception as err:  # truncated or not safetensors at all
            raise TrainInputError(f"cannot read packed table {self.path}: {type(err).__name__}: {err}") from err
        expected = packing_fingerprint(packer)
        if meta.get("packing") != expected:
            raise TrainInputError(
                f"{self.path} was packed with other caption settings than this run's: file {meta.get('packing')}, "
                f"run {expected} (tokenizer ids, --max-short-len/--max-long-len, --text-pairs). Write the table "
                "again for this model and these flags")
        if len(self.images) != len(self.texts):
            raise TrainInputError(f"{self.path}: {len(self.images)} images but {len(self.texts)} caption rows")
        self.pixels = None
        if "preprocess" in meta:
            if meta["preprocess"] != repr(transform):
                raise TrainInputError(
                    f"{self.path} is meant for the transform\n{meta['preprocess']}\nbut this run's transform is\n"
                    f"{transform!r}\n(an --aug-cfg, or another model). Write the table without preprocess= to "
                    "apply any transform per sample")
            # a deterministic transform: every image once, now
            self.pixels = torch.stack([transform(_to_pil(img)) for img in self.images])
        self.transform = transform
        self.seed = seed
        self.shared_epoch = shared_epoch

    def __len__(self) -> int:
        return int(self.texts.shape[0])

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pixels is not None:
            return self.pixels[idx], self.texts[idx]
        epoch = self.shared_epoch.get_value() if self.shared_epoch is not None else 0
        image = _to_pil(self.images[idx])
        return seeded_transform(self.transform, image, sample_seed(self.seed, epoch, idx)), self.texts[idx]


def get_packed_dataset(args, preprocess_fn, is_train: bool, epoch: int = 0, tokenizer=None):
    """open_clip_train's dataset-builder contract for a packed table (``--train-data`` / ``--val-data``)."""
    path = args.train_data if is_train else args.val_data
    dataset = PackedTableDataset(path, preprocess_fn, make_packer(args, tokenizer),
                                 seed=int(getattr(args, "seed", 0) or 0))
    # packed images never fail to load; the counter is there so every DataInfo has one
    return _map_loader(args, dataset, is_train, SkipCounter("train" if is_train else "val"), epoch)
