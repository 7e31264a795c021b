"""Pieces shared by every training dataset: caption packing, safe image loading, the skip counter, and the error
for bad training input."""
from __future__ import annotations

import codecs
import hashlib
import io
import logging
import math
import multiprocessing
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_logger = logging.getLogger(__name__)

# What a broken image file can raise while PIL opens and decodes it.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class TrainInputError(ValueError):
    """Flags or training data that cannot be used; the message names what is wrong and how to fix it.
    ``vladva-train`` prints it as one line (no traceback) and exits with status 2."""


def check_encoding(encoding: str) -> str:
    """``encoding`` if Python knows it, else a :class:`TrainInputError`."""
    try:
        codecs.lookup(encoding)
    except LookupError as err:
        raise TrainInputError(f"unknown --csv-encoding {encoding!r}; use a Python codec name such as utf-8, "
                              "utf-8-sig, latin-1 or cp1252") from err
    return encoding


def decode_error_message(path: str | Path, encoding: str, chunk_size: int = 1 << 20) -> str | None:
    """Where ``path`` stops being valid ``encoding`` text, as a message naming the line, byte offset and bytes,
    and how to fix it; None if the whole file decodes. Reads the file in chunks (incremental decoder), so the
    offset is exact for any file size."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset, line = 0, 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            final = not chunk
            try:
                decoder.decode(chunk, final=final)
            except UnicodeDecodeError as err:
                # the decoder's position counts from the bytes it still held back plus this chunk
                pending = len(err.object) - len(chunk)
                bad_at = offset - pending + err.start
                head = err.object[: err.start]
                line += head.count(b"\n")
                bad = err.object[err.start:err.end + 3]
                return (f"{path} is not valid {encoding} text: line {line}, byte {bad_at} ({bad!r}: {err.reason}). "
                        f"Pass the file's encoding with --csv-encoding (e.g. --csv-encoding latin-1 or cp1252), or "
                        f"convert it to UTF-8 (iconv -f LATIN1 -t UTF-8 {Path(path).name} > fixed.csv)")
            if final:
                return None
            line += chunk.count(b"\n")
            offset += len(chunk)


def pack_captions(short_ids: torch.Tensor, long_ids: torch.Tensor | None, length: int, pad_id: int) -> torch.Tensor:
    """Pack a short and a long caption into one ``LongTensor [2, length]``.

    Row 0 holds ``short_ids`` and row 1 ``long_ids``, each right-padded with ``pad_id``; ``long_ids=None`` (no long
    caption) gives an all-pad row 1, which the model masks out of the next-token loss.

    Args:
        short_ids: ``[Ls]`` token ids (already right-padded by the tokenizer, ``Ls <= length``).
        long_ids: ``[Ll]`` token ids with ``Ll <= length``, or None.
        length: L, the packed row length (``max_long_len``).
        pad_id: the tokenizer's pad id.
    """
    out = torch.full((2, length), int(pad_id), dtype=torch.long)
    for row, ids in enumerate((short_ids, long_ids)):
        if ids is None:
            continue
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 1:
            raise ValueError(f"caption ids must be 1-D, got shape {tuple(ids.shape)} for row {row}")
        if ids.numel() > length:
            raise ValueError(
                f"{'short' if row == 0 else 'long'} caption has {ids.numel()} tokens but rows hold {length}; "
                "tokenize with context_length <= max_long_len"
            )
        out[row, : ids.numel()] = ids
    return out


def clean_caption(value) -> str | None:
    """A caption cell as text, or None when it is missing (None, NaN, empty or whitespace)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    return text or None


class CaptionPacker:
    """``(short, long) -> LongTensor [2, max_long_len]`` with the tokenizer protocol
    ``tokenizer(texts, context_length=n) -> LongTensor [B, n]`` (right-padded with ``tokenizer.pad_token_id``).

    Picklable whenever the tokenizer is, so DataLoader workers can use it. ``pair_text``: row 1 is a second text
    for the text tower (E5-V-style text pairs, ``--text-pairs``), tokenized as the short caption is.
    """

    def __init__(self, tokenizer, max_short_len: int, max_long_len: int, pair_text: bool = False):
        if tokenizer is None:
            raise ValueError("the training data needs the model's tokenizer (got None)")
        if max_short_len > max_long_len:
            raise ValueError(
                f"max_short_len ({max_short_len}) > max_long_len ({max_long_len}): short captions are packed into "
                "rows of max_long_len tokens; raise --max-long-len or lower --max-short-len"
            )
        self.tokenizer = tokenizer
        self.max_short_len = max_short_len
        self.max_long_len = max_long_len
        self.pair_text = pair_text
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)  # open_clip's own tokenizers pad with 0 and have no attribute
        # samples with an empty short caption, shared with DataLoader workers (as SkipCounter's count)
        self.empty_short = multiprocessing.Value("q", 0)

    def __call__(self, short: str | None, long: str | None) -> torch.Tensor:
        if not short:
            self._count_empty()
        short_ids = self.tokenizer([short or ""], context_length=self.max_short_len)[0]
        # Long captions are the assistant's answer after the image prompt; VladVA's tokenizer knows that context
        # (other tokenizers, e.g. open_clip's own for a CLIP baseline, tokenize the caption alone).
        encode_long = getattr(self.tokenizer, "long_captions", self.tokenizer)
        if self.pair_text:
            encode_long, length = self.tokenizer, self.max_short_len
        else:
            length = self.max_long_len
        long_ids = encode_long([long], context_length=length)[0] if long else None
        return pack_captions(short_ids, long_ids, self.max_long_len, self.pad_id)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if multiprocessing.context.get_spawning_popen() is None:
            # plain pickling (a copy, not a DataLoader worker being started): the copy counts on its own
            state["empty_short"] = int(self.empty_short.value)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("empty_short"), int):
            state["empty_short"] = multiprocessing.Value("q", state["empty_short"])
        self.__dict__.update(state)

    def _count_empty(self) -> None:
        with self.empty_short.get_lock():
            self.empty_short.value += 1
            first = self.empty_short.value == 1
        if first:
            _logger.warning("a sample has an empty short caption: it trains as an empty text (the text tower sees "
                            "only its prompt). Further ones are counted, and the count is logged after each epoch")

    def report_empty(self) -> int:
        """Log (once per call) how many samples so far had an empty short caption; returns the count."""
        total = int(self.empty_short.value)
        if total:
            _logger.warning("%d samples so far had an empty short caption (trained as empty texts)", total)
        return total


def sample_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (e.g. run seed, epoch, sample id), stable across processes and runs."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_transform(transform: Callable, image: Image.Image, seed: int) -> torch.Tensor:
    """``transform(image)`` with torch's, Python's and NumPy's global RNGs seeded by ``seed``, then restored.

    Random augmentations (open_clip's train transform crops at random) then depend only on the sample and epoch,
    not on how many random numbers the process drew before: a run resumed mid-epoch, or read with another
    worker count, sees the same augmented pixels.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        try:
            return transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Open and fully decode an image (a path or encoded bytes) as RGB; raises one of :data:`IMAGE_ERRORS`."""
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(fp) as img:
        img.load()  # decode now, so a truncated file fails here and not inside the transform
        return img.convert("RGB")


class SkipCounter:
    """Count of samples skipped because their image was missing or corrupt, shared across DataLoader workers.

    The count lives in a ``multiprocessing.Value``, so increments made in worker processes are visible in the
    trainer (``data["train"].skips.value``). Each skip is logged with where it happened; after ``log_limit`` of
    them, further ones are logged at DEBUG level only. A bad file is counted every time it is read (once per
    epoch), so the value counts skip events.
    """

    def __init__(self, name: str = "train", log_limit: int = 50):
        self.name = name
        self.log_limit = log_limit
        self._count = multiprocessing.Value("q", 0)

    @property
    def value(self) -> int:
        return int(self._count.value)

    def reset(self) -> None:
        with self._count.get_lock():
            self._count.value = 0

    def record(self, where: str, error: BaseException | str) -> int:
        """Count one skipped sample and log it; returns the running total."""
        with self._count.get_lock():
            self._count.value += 1
            total = self._count.value
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if total <= self.log_limit:
            _logger.warning("%s data: skipped %s (%s); %d skipped so far", self.name, where, reason, total)
            if total == self.log_limit:
                _logger.warning("%s data: further skipped samples are logged at DEBUG level", self.name)
        else:
            _logger.debug("%s data: skipped %s (%s); %d skipped so far", self.name, where, reason, total)
        return total

    def __repr__(self) -> str:
        return f"SkipCounter(name={self.name!r}, value={self.value})"
