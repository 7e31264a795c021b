"""``vladva embed``: image and caption embeddings of a whole collection, in clip-retrieval's layout.

Works with any open_clip model (VladVA or CLIP): only ``encode_image``/``encode_text``, the preprocess transform
and the tokenizer are used, through the evaluator's precision handling and length-bucketed text batches.

- Partitions are fixed by the input and ``shard_size`` alone (see :mod:`.sources`); under torchrun rank ``r`` of
  ``W`` takes partitions ``k % W == r`` and writes their shards itself.
- Resumable: a shard is skipped when its marker exists (see :mod:`.layout`) and records the same inputs (a hash
  of the partition's file names, sizes, mtimes and captions, or of the tar's); a rerun of the same command redoes
  only unfinished shards and shards whose inputs changed, and gives byte-identical files. A rerun with other
  settings into the same folder is refused (``overwrite=True`` starts over).
- A missing or corrupt image is skipped: logged, counted, and listed in the manifest with its reason; rows of
  the three files stay aligned. So is a row whose embedding came out NaN/inf.
- Every image is embedded whether or not it has a caption. With text embeddings on, a row without a caption gets
  an all-zero text vector (search never returns it) and is counted in the manifest (``counts.captionless``).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..eval.embed import PRECISIONS, EmbedConfig, Embedder, autocast_for
from ..progress import progress
from ..train._common import SkipCounter
from .dist import DistContext
from .layout import MANIFEST, STATE_DIR, OutputFolder, atomic_write_json
from .sources import Sample, Source, open_source

__all__ = ["DTYPES", "EmbedJobConfig", "EmbedJobError", "run_embed"]

_logger = logging.getLogger(__name__)

#: output dtypes (clip-retrieval writes float16)
DTYPES = {"float16": np.float16, "fp16": np.float16, "float32": np.float32, "fp32": np.float32}
FORMAT_VERSION = 1


class EmbedJobError(RuntimeError):
    """The job cannot run as asked (e.g. the output folder holds a job with other settings)."""


@dataclass
class EmbedJobConfig:
    """What to embed and how.

    input: an image folder, a .csv/.tsv table or webdataset shards (``input_format`` auto-detects);
    output: the embedding folder; model/pretrained: open_clip names (also recorded in the manifest when a built
    model is passed to :func:`run_embed`); images/texts: which embeddings to write (texts None: when the input has a
    caption for every row; True: also when some rows have none); shard_size: rows per output shard (files and
    webdataset: one shard per tar); dtype: float16 or float32; precision: as for vladva-eval; device: default
    ``cuda:LOCAL_RANK`` when CUDA is there, else CPU; workers: image-decoding processes per rank. Rows without a
    caption keep their image embedding; their text vector is all zeros.
    """

    input: str
    output: str
    model: str | None = None
    pretrained: str | None = None
    input_format: str = "auto"
    images: bool = True
    texts: bool | None = None
    shard_size: int = 50_000
    dtype: str = "float16"
    batch_size: int = 64
    workers: int = 4
    precision: str = "fp32"
    device: str | None = None
    csv_img_key: str = "filepath"
    csv_caption_key: str | None = None
    csv_separator: str | None = None
    wds_caption_key: str = "txt"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.shard_size < 1 or self.batch_size < 1 or self.workers < 0:
            raise ValueError("shard_size and batch_size must be >= 1 and workers >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose from {sorted(DTYPES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose from {list(PRECISIONS)}")
        if not self.images and self.texts is False:
            raise ValueError("nothing to embed: images and texts are both off")


def _as_list(batch: list[Sample]) -> list[Sample]:
    return batch


@dataclass
class _Shard:
    """What one partition produced, in row order."""

    rows: list[int]
    keys: list[str]
    captions: list[str | None]
    shards: list[str | None]
    image: np.ndarray | None
    text: np.ndarray | None
    skipped: list[dict[str, Any]]


class _Job:
    def __init__(self, config: EmbedJobConfig, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 source: Source, texts: bool, device: torch.device, ctx: DistContext):
        self.config, self.model, self.preprocess, self.tokenizer = config, model, preprocess, tokenizer
        self.source, self.texts, self.device, self.ctx = source, texts, device, ctx
        self.dtype = DTYPES[config.dtype]
        self.skips = SkipCounter("embed")
        self.text_embedder = Embedder(model, preprocess, tokenizer,
                                      EmbedConfig(batch_size=config.batch_size, precision=config.precision,
                                                  progress=False), device=device)

    def _finite(self, emb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """[B, D] -> (L2-normalised in fp32 then the output dtype, [B] bool: the row is finite after the cast)."""
        out = F.normalize(emb.float(), dim=-1).cpu().numpy().astype(self.dtype)
        return out, np.isfinite(out).all(axis=1)

    @torch.no_grad()
    def partition(self, k: int, bar) -> _Shard:
        c = self.config
        dataset = self.source.dataset(k, c.shard_size, self.preprocess if c.images else None)
        loader = DataLoader(dataset, batch_size=c.batch_size, shuffle=False, num_workers=c.workers,
                            collate_fn=_as_list, pin_memory=self.device.type == "cuda")
        good: list[Sample] = []
        skipped: list[dict[str, Any]] = []
        image_parts, image_ok = [], []
        image_dtype = PRECISIONS[c.precision].images

        def skip(s: Sample, reason: str) -> None:
            self.skips.record(s.key, reason)
            skipped.append({"row": s.row, "key": s.key, "reason": reason, **({"shard": s.shard} if s.shard else {})})

        for batch in loader:
            kept = []
            for s in batch:
                if c.images and s.error:
                    skip(s, s.error)
                elif not c.images and self.texts and s.caption is None:
                    skip(s, "no caption (captions only: --no-images)")
                else:
                    kept.append(s)
            if c.images and kept:
                pixels = torch.stack([s.pixels for s in kept]).to(self.device, non_blocking=True)
                pixels = pixels.to(image_dtype) if image_dtype is not None else pixels
                with autocast_for(c.precision, self.device):
                    emb, ok = self._finite(self.model.encode_image(pixels, normalize=True))
                image_parts.append(emb)
                image_ok.append(ok)
            good += kept
            if bar is not None:
                bar.update(len(batch))
        order = np.argsort(np.asarray([s.row for s in good], dtype=np.int64), kind="stable")  # workers interleave
        good = [good[i] for i in order.tolist()]
        keep = np.ones(len(good), dtype=bool)
        image = None
        if image_parts:
            image = np.concatenate(image_parts)[order]
            keep &= np.concatenate(image_ok)[order]
        text = None
        if self.texts and good:
            text = np.zeros((len(good), image.shape[1] if image is not None else 0), dtype=self.dtype)
            captioned = [i for i, s in enumerate(good) if s.caption is not None]
            if captioned:
                emb, ok = self._finite(self.text_embedder.texts([good[i].caption for i in captioned]))
                if text.shape[1] != emb.shape[1]:
                    text = np.zeros((len(good), emb.shape[1]), dtype=self.dtype)
                text[captioned] = emb
                keep[np.asarray(captioned)[~ok]] = False
        for i in np.flatnonzero(~keep).tolist():
            skip(good[i], "non-finite embedding (the model produced NaN/inf for this row)")
        if not keep.all():
            _logger.warning("shard %d: %d rows had NaN/inf embeddings and were skipped", k, int((~keep).sum()))
        good = [s for s, ok in zip(good, keep.tolist()) if ok]
        image = image[keep] if image is not None else None
        text = text[keep] if text is not None else None
        return _Shard([s.row for s in good], [s.key for s in good], [s.caption for s in good],
                      [s.shard for s in good], image, text, sorted(skipped, key=lambda r: r["row"]))

    def metadata(self, shard: _Shard) -> pd.DataFrame:
        """clip-retrieval's columns (image_path, caption) plus the input row (and the tar, for webdataset)."""
        columns: dict[str, list] = {"image_path": shard.keys, "caption": shard.captions, "row": shard.rows}
        if self.source.kind == "webdataset":
            columns["shard"] = shard.shards
        df = pd.DataFrame(columns)
        df["row"] = df["row"].astype("int64")
        return df


def _weights_key(model: torch.nn.Module) -> str:
    from ..eval.cache import weights_fingerprint

    return weights_fingerprint(model)


def _job_record(config: EmbedJobConfig, source: Source, texts: bool, model: torch.nn.Module, preprocess: Callable,
                tokenizer: Callable, partition_count: int) -> dict[str, Any]:
    """Everything that decides the shards' bytes; a rerun into the same folder must match it."""
    pp_cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
    return {
        "format_version": FORMAT_VERSION,
        "model": {"name": config.model, "pretrained": config.pretrained, "class": type(model).__name__,
                  "weights_fingerprint": _weights_key(model)},
        "preprocessing": {"transform": repr(preprocess), "preprocess_cfg": dict(pp_cfg) if pp_cfg else None},
        "tokenizer": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "input": source.describe(),
        "images": config.images, "texts": texts, "dtype": np.dtype(DTYPES[config.dtype]).name,
        "precision": config.precision, "shard_size": config.shard_size, "partition_count": partition_count,
    }


def _plain_json(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as it reads back from JSON (tuples become lists), so a rerun compares like with like."""
    return json.loads(json.dumps(record, default=str))


def _digest(record: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(record, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _prepare_output(out: OutputFolder, job: dict[str, Any], overwrite: bool) -> str | None:
    """Rank 0: check (or start over) the folder and write the job file; returns an error message or None."""
    existing = None
    if out.job_file.is_file():
        try:
            existing = json.loads(out.job_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            existing = None
        existing = existing if isinstance(existing, dict) else None
    if not overwrite:
        if existing is not None and existing.get("digest") != job["digest"]:
            diffs = sorted(k for k in set(job) | set(existing) if k != "digest" and job.get(k) != existing.get(k))
            return (f"{out.root} holds embeddings made with other settings (differences: {', '.join(diffs)}); "
                    "rerun with the same settings to resume, use another --output, or pass --overwrite to start over")
        if existing is None and out.shard_files():
            return (f"{out.root} holds embedding files that `vladva embed` did not write (no {STATE_DIR}/job.json); "
                    "use another --output, or pass --overwrite to replace them")
    if existing is None or existing.get("digest") != job["digest"]:
        for path in out.shard_files():  # overwrite: the old job's shards and progress go
            path.unlink()
        if (out.root / STATE_DIR).is_dir():
            shutil.rmtree(out.root / STATE_DIR)
        (out.root / MANIFEST).unlink(missing_ok=True)
        atomic_write_json(out.job_file, job)
    removed = out.clean_temporaries()
    if removed:
        _logger.info("removed %d temporary files of an interrupted run", removed)
    return None


def _resolve_texts(config: EmbedJobConfig, source: Source) -> bool:
    if config.texts is not None:
        if config.texts and not source.has_captions():
            raise EmbedJobError(f"texts=True but {config.input} has no captions")
        return config.texts
    if not source.has_captions():
        return False
    missing = getattr(source, "missing_captions", lambda: 0)()
    if missing:
        _logger.warning("%d rows have no caption: text embeddings are off (pass --texts to embed the captions too; "
                        "rows without one keep their image and get an all-zero text vector)", missing)
        return False
    return True


def run_embed(config: EmbedJobConfig, *, model: torch.nn.Module | None = None, preprocess: Callable | None = None,
              tokenizer: Callable | None = None,
              on_shard: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the job; every rank of a torchrun launch calls this. Returns the manifest.

    Args:
        model, preprocess, tokenizer: a built open_clip model with its val transform and tokenizer; when None they
            are built from ``config.model``/``config.pretrained`` with ``open_clip.create_model_and_transforms``.
        on_shard: called with each shard's record after the shard is on disk.
    """
    ctx = DistContext.from_env()
    try:
        return _run(config, ctx, model, preprocess, tokenizer, on_shard)
    finally:
        ctx.close()


def _run(config, ctx, model, preprocess, tokenizer, on_shard) -> dict[str, Any]:
    from ..eval.api import ModelSpec, load_model

    start = time.perf_counter()
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise EmbedJobError(f"--output {output} is a file: give a folder (new, or one vladva embed wrote)")
    if any(parent.exists() and not parent.is_dir() for parent in output.absolute().parents):
        raise EmbedJobError(f"--output {output}: a part of the path is a file, not a folder; give another folder")
    source = open_source(config.input, config.input_format, csv_img_key=config.csv_img_key,
                         csv_caption_key=config.csv_caption_key, csv_separator=config.csv_separator,
                         wds_caption_key=config.wds_caption_key)
    texts = _resolve_texts(config, source)
    if model is None:
        if not config.model:
            raise EmbedJobError("give a model name (or a built model)")
        device = torch.device(config.device) if config.device else ctx.default_device()
        model, preprocess, tokenizer = load_model(ModelSpec(config.model, config.pretrained), device=device,
                                                  precision=config.precision)
    else:
        if preprocess is None or tokenizer is None:
            raise EmbedJobError("a built model needs its preprocess transform and tokenizer as well")
        param = next(iter(model.parameters()), None)
        device = torch.device(config.device) if config.device else (param.device if param is not None
                                                                      else torch.device("cpu"))
        model = model.to(device).eval()
    partition_count = source.partition_count(config.shard_size)
    out = OutputFolder(config.output, partition_count)
    job = _plain_json(_job_record(config, source, texts, model, preprocess, tokenizer, partition_count))
    job["digest"] = _digest(job)
    error = _prepare_output(out, job, config.overwrite) if ctx.rank == 0 else None
    error = ctx.broadcast(error)
    if error:
        raise EmbedJobError(error)
    ctx.barrier()

    mine = [k for k in range(partition_count) if k % ctx.world_size == ctx.rank]
    records: dict[int, dict[str, Any]] = {}
    todo = []
    inputs = {k: source.partition_fingerprint(k, config.shard_size) for k in mine}
    changed = []
    for k in mine:
        done = out.finished(k)
        if done is not None and done.get("digest") == job["digest"] and done.get("inputs") == inputs[k]:
            records[k] = done
        else:
            if done is not None and done.get("digest") == job["digest"]:
                changed.append(k)
            todo.append(k)
    if changed:
        _logger.warning("rank %d: the inputs of finished shard(s) %s changed since they were embedded; embedding "
                        "them again", ctx.rank, changed)
    if records:
        _logger.info("rank %d: %d of its %d shards are already finished; %d to go", ctx.rank, len(records),
                     len(mine), len(todo))
    sizes = [source.partition_size(k, config.shard_size) for k in todo]
    bar = None
    if config.progress and ctx.rank == 0:  # one bar: rank 0's own rows (the others run at the same pace)
        bar = progress(total=sum(sizes) if None not in sizes else None, unit="img" if config.images else "text",
                       desc="embed" + (f" (rank 0 of {ctx.world_size})" if ctx.distributed else ""), smoothing=0.1)
    runner = _Job(config, model, preprocess, tokenizer, source, texts, device, ctx)
    try:
        for k in todo:
            t0 = time.perf_counter()
            shard = runner.partition(k, bar)
            arrays = {}
            if shard.image is not None:
                arrays["image"] = shard.image
            if shard.text is not None:
                arrays["text"] = shard.text
            record = out.write_shard(k, arrays, runner.metadata(shard), {
                "digest": job["digest"], "inputs": inputs[k], "rank": ctx.rank, "skipped": shard.skipped,
                "captionless": sum(c is None for c in shard.captions) if shard.text is not None else 0,
                "embed_dim": next((int(a.shape[1]) for a in arrays.values()), None),
                "seconds": round(time.perf_counter() - t0, 3)})
            records[k] = record
            if bar is not None:
                bar.set_postfix(shard=f"{k + 1}/{partition_count}", refresh=False)
            if on_shard is not None:
                on_shard(record)
    finally:
        if bar is not None:
            bar.close()
    gathered = ctx.gather(records)
    manifest = _manifest(config, job, {k: r for part in gathered for k, r in part.items()}, ctx,
                         time.perf_counter() - start, source.image_roots(), source.caption_errors())
    if ctx.rank == 0:
        atomic_write_json(Path(config.output) / MANIFEST, manifest)
        c = manifest["counts"]
        _logger.info("embedded %d rows (%d skipped) into %d shards in %s", c["embedded"], c["skipped"],
                     partition_count, config.output)
    ctx.barrier()
    return manifest


def _manifest(config: EmbedJobConfig, job: dict[str, Any], records: dict[int, dict[str, Any]], ctx: DistContext,
              seconds: float, image_roots: list[str], caption_errors: list[dict[str, str]]) -> dict[str, Any]:
    """The job's record plus counts (``captionless``: rows embedded with no caption, their text vector all zeros;
    ``caption_errors``: caption files that could not be read, their rows kept as caption-less), what was skipped and
    why, and ``image_roots``: where the inputs' images are (what a results page may show)."""
    import open_clip

    import vladva_openclip

    skipped = [dict(s, output_shard=k) for k in sorted(records) for s in records[k].get("skipped", [])]
    embedded = sum(r["count"] for r in records.values())
    captionless = sum(int(r.get("captionless", 0)) for r in records.values())
    dims = {r.get("embed_dim") for r in records.values()} - {None}
    return {
        **{k: v for k, v in job.items() if k != "digest"},
        "layout": "clip-retrieval: img_emb/img_emb_{k}.npy, text_emb/text_emb_{k}.npy, metadata/metadata_{k}.parquet",
        "normalized": True,
        "embed_dim": dims.pop() if len(dims) == 1 else None,
        "metadata_columns": ["image_path", "caption", "row"] + (["shard"] if job["input"]["kind"] == "webdataset"
                                                                else []),
        "counts": {"embedded": embedded, "skipped": len(skipped), "rows_read": embedded + len(skipped),
                   "images": embedded if config.images else 0,
                   "texts": embedded - captionless if job["texts"] else 0, "captionless": captionless,
                   "caption_errors": len(caption_errors),
                   "shards": len(records), "empty_shards": sum(r["count"] == 0 for r in records.values())},
        "skipped": skipped,
        "caption_errors": caption_errors,
        "image_roots": image_roots,
        "shards": [{"shard": k, "count": r["count"], "skipped": len(r.get("skipped", [])), "rank": r.get("rank"),
                    "seconds": r.get("seconds")} for k, r in sorted(records.items())],
        "world_size": ctx.world_size,
        "seconds": round(seconds, 3),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"vladva_openclip": vladva_openclip.__version__, "open_clip": open_clip.__version__,
                     "torch": torch.__version__},
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("overwrite", "progress")},
        "digest": job["digest"],
    }


def manifest_of(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
