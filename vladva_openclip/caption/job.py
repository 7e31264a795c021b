"""``run_caption``: a captioning job over a whole collection, data-parallel and resumable per shard.

- Partitions are those of ``vladva embed`` (:mod:`.inputs`): fixed by the input and ``shard_size`` alone, so
  rank ``r`` of ``W`` takes partitions ``k % W == r`` and a rerun with another process count finds the same
  partitions. No work queue, no communication during the job.
- Each finished partition is one sidecar parquet written atomically (after its rewritten tar, if any): a
  killed run loses at most the partitions it was working on, and a rerun skips every sidecar that carries the
  job's digest and its input files' fingerprint (names, sizes, mtimes, captions: a shard replaced since is
  redone). With greedy decoding the rerun's files equal an uninterrupted run's.
- A rerun with other settings (captioner, prompts, decoding, thresholds, input) into the same folder is refused;
  ``overwrite=True`` starts over.
- A missing or corrupt image is skipped: counted, logged, and listed in the sidecar's record and the manifest.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from .._fs import write_atomically
from ..progress import progress
from ..retrieval.dist import DistContext
from ..retrieval.sources import Sample, Source
from ..train._common import SkipCounter
from .backends import Captioner, Generation, build_captioner
from .clipscore import ClipScorer
from .config import CaptionJobConfig, settings_hash
from .inputs import open_caption_source, partition_names
from .output import JOB_FILE, MANIFEST, JobFolder, read_sidecar, rewrite_tar, write_json, write_sidecar
from .quality import finish_caption

__all__ = ["CaptionJobError", "plan_row", "run_caption"]

_logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class CaptionJobError(RuntimeError):
    """The job cannot run as asked (e.g. the output folder holds a job with other settings)."""


def plan_row(caption: str | None, n_tokens: int | None, kinds: tuple[str, ...], only_missing: bool,
             short_max: int) -> dict[str, tuple[bool, str | None]]:
    """kind -> (generate it?, the existing text used otherwise) for one row with alt-text ``caption``.

    As in the paper, an existing caption under ``short_max`` target tokens is a short caption, a longer one a long
    caption. With ``only_missing`` only the kinds the row lacks are generated. Otherwise every requested kind is
    generated, and the alt-text (any length) stays the short caption when no short one is generated.
    """
    is_short = caption is not None and n_tokens is not None and n_tokens < short_max
    existing = {"short": caption if is_short else None,
                "long": caption if caption is not None and not is_short else None}
    plan = {}
    for kind in ("short", "long"):
        generate = kind in kinds and (not only_missing or existing[kind] is None)
        fallback = existing[kind] if (only_missing or kind == "long") else caption
        plan[kind] = (generate, None if generate else fallback)
    return plan


class _Prepare:
    """Image -> (captioner input, CLIP input or None), in the DataLoader workers (holds transforms, not models)."""

    def __init__(self, transform: Callable, clip: Callable | None):
        self.transform, self.clip = transform, clip

    def __call__(self, image):
        return self.transform(image), (self.clip(image) if self.clip is not None else None)


def _as_list(batch: list[Sample]) -> list[Sample]:
    return batch


@dataclass
class _Stats:
    images: int = 0
    generated: int = 0
    tokens: int = 0
    started: float = 0.0


class _Runner:
    def __init__(self, config: CaptionJobConfig, captioner: Captioner, count: Callable[[str], int],
                 clip: ClipScorer | None, source: Source, keys: Callable[[int, Sample], str], shash: str):
        self.config, self.captioner, self.count, self.clip = config, captioner, count, clip
        self.source, self.keys, self.shash = source, keys, shash
        self.prompts = {k: captioner.full_prompt(config.instruction(k)) for k in ("short", "long")}
        self.model_name = captioner.model_name
        self.skips = SkipCounter("caption")
        self.stats = _Stats(started=time.perf_counter())

    def _generate(self, kind: str, inputs: list[Any]) -> list[Generation]:
        """One generate call; on CUDA out-of-memory the batch is halved (recursively) instead of failing the job,
        which gives the same captions since a left-padded batch equals its rows one by one."""
        c = self.config
        try:
            return self.captioner.generate(inputs, c.instruction(kind), c.generation(kind))
        except torch.cuda.OutOfMemoryError:
            if len(inputs) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(inputs) // 2
            _logger.warning("out of memory generating %d %s captions at once; retrying in halves (lower "
                            "--batch-size to avoid the retries)", len(inputs), kind)
            return self._generate(kind, inputs[:half]) + self._generate(kind, inputs[half:])

    def batch(self, samples: list[Sample], k: int) -> list[dict[str, Any]]:
        """Rows of the good samples of one loader batch."""
        c = self.config
        rows = []
        for s in samples:
            n = self.count(s.caption) if s.caption else None
            rows.append({"sample": s, "plan": plan_row(s.caption, n, c.kinds, c.only_missing,
                                                       c.quality.short_max_tokens)})
        results: dict[str, dict[int, Generation]] = {"short": {}, "long": {}}
        for kind in ("long", "short"):
            todo = [i for i, r in enumerate(rows) if r["plan"][kind][0]]
            for start in range(0, len(todo), c.batch_size):
                part = todo[start:start + c.batch_size]
                out = self._generate(kind, [rows[i]["sample"].pixels[0] for i in part])
                for i, g in zip(part, out):
                    results[kind][i] = g
                    self.stats.tokens += g.n_tokens
                    self.stats.generated += 1
        records = []
        for i, r in enumerate(rows):
            s: Sample = r["sample"]
            rec: dict[str, Any] = {"key": self.keys(k, s), "row": s.row, "shard": s.shard,
                                   "filepath": None if s.shard else s.key, "model": self.model_name,
                                   "settings_hash": self.shash, "flags": []}
            for kind in ("short", "long"):
                generate, existing = r["plan"][kind]
                if generate:
                    g = results[kind][i]
                    text, n, flags = finish_caption(kind, g.text, g.finish_reason, self.count, c.quality)
                    rec.update({f"{kind}_caption": text or None, f"{kind}_source": "generated",
                                f"{kind}_prompt": self.prompts[kind], f"{kind}_raw": g.text,
                                f"{kind}_generated_tokens": g.n_tokens, f"{kind}_finish_reason": g.finish_reason,
                                f"{kind}_n_tokens": n})
                    rec["flags"] += [f"{kind}:{f}" for f in flags]
                elif existing is not None:
                    rec.update({f"{kind}_caption": existing, f"{kind}_source": "existing",
                                f"{kind}_n_tokens": self.count(existing)})
            records.append(rec)
        if self.clip is not None:
            for kind in ("short", "long"):
                scores = self.clip.score([r["sample"].pixels[1] for r in rows],
                                         [rec.get(f"{kind}_caption") for rec in records], split=kind == "long")
                for rec, score in zip(records, scores):
                    rec[f"{kind}_clip_score"] = score
                    if score is not None and c.quality.min_clip_score is not None and score < c.quality.min_clip_score:
                        rec["flags"].append(f"{kind}:low_clip_score")
        return records

    @torch.no_grad()
    def partition(self, k: int, bar) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        """(rows in input order, skipped rows, rows read) of partition ``k``."""
        c = self.config
        dataset = self.source.dataset(k, c.shard_size, _Prepare(self.captioner.image_transform(),
                                                                 self.clip.preprocess if self.clip else None))
        loader = DataLoader(dataset, batch_size=c.batch_size, shuffle=False, num_workers=c.workers,
                            collate_fn=_as_list)
        rows, skipped, read = [], [], 0
        for batch in loader:
            read += len(batch)
            good = []
            for s in batch:
                if s.error:
                    self.skips.record(s.key, s.error)
                    # PIL names an in-memory file by its address: drop it, so a rerun writes the same record
                    reason = _ADDRESS.sub("", s.error)
                    skipped.append({"row": s.row, "key": self.keys(k, s), "reason": reason})
                else:
                    good.append(s)
            # the loader's workers interleave rows: generate in row order, so batches do not depend on them
            good.sort(key=lambda s: s.row)
            rows += self.batch(good, k) if good else []
            self.stats.images += len(batch)
            if bar is not None:
                elapsed = max(time.perf_counter() - self.stats.started, 1e-9)
                bar.set_postfix({"img/s": f"{self.stats.images / elapsed:.2f}",
                                 "tok/s": f"{self.stats.tokens / elapsed:.1f}"}, refresh=False)
                bar.update(len(batch))
        rows.sort(key=lambda r: r["row"])
        return rows, sorted(skipped, key=lambda r: r["row"]), read


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("vladva_openclip", "torch", "transformers", "open_clip_torch", "vllm"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    out["torch"] = torch.__version__
    return out


def _counter(config: CaptionJobConfig, captioner: Captioner) -> Callable[[str], int]:
    """Length in the target model's tokenizer: an open_clip model name or a tokenizer directory."""
    name = config.target_tokenizer
    if not name:
        return captioner.count_tokens
    if Path(name).is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        return lambda text: len(tok(text, add_special_tokens=False).input_ids)
    import open_clip

    import vladva_openclip  # noqa: F401  (registers the vladva-* tokenizers)

    tok = open_clip.get_tokenizer(name)
    encode = getattr(tok, "encode", None)
    if encode is None:
        raise ValueError(f"the tokenizer of {name!r} cannot count tokens (no encode); give a tokenizer directory")
    return lambda text: len(encode(text))


def _source(config: CaptionJobConfig) -> Source:
    return open_caption_source(config.input, config.input_format, img_key=config.img_key,
                               caption_key=config.caption_key, key_column=config.key_column,
                               separator=config.csv_separator, wds_caption_key=config.wds_caption_key)


def _job_record(config: CaptionJobConfig, source: Source, captioner: Captioner, names: list[str]) -> dict[str, Any]:
    settings = {"captioner": captioner.describe(), **config.decided_by(),
                "full_prompts": {k: captioner.full_prompt(config.instruction(k)) for k in config.kinds}}
    job = {
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "settings_hash": settings_hash(settings),
        "input": {**source.describe(), "spec": {
            "input": config.input, "input_format": config.input_format, "img_key": config.img_key,
            "caption_key": config.caption_key, "key_column": config.key_column,
            "csv_separator": config.csv_separator, "wds_caption_key": config.wds_caption_key}},
        "shard_size": config.shard_size, "partitions": names,
        "outputs": {"wds": config.write_wds, "csv": config.write_csv},
    }
    job["digest"] = settings_hash(job)
    return job


def _prepare_folder(folder: JobFolder, job: dict[str, Any], overwrite: bool) -> str | None:
    """Rank 0: refuse another job's folder (unless ``overwrite``), else write the job file; an error or None."""
    existing = None
    if folder.job_file.is_file():
        try:
            existing = json.loads(folder.job_file.read_text())
        except json.JSONDecodeError:
            existing = None
    same = existing is not None and existing.get("digest") == job["digest"]
    if not overwrite and not same:
        if existing is not None:
            diffs = sorted(k for k in ("settings", "input", "shard_size", "partitions", "outputs")
                           if existing.get(k) != job.get(k))
            inner = sorted(k for k in job["settings"] if existing.get("settings", {}).get(k) != job["settings"][k])
            return (f"{folder.root} holds captions made with other settings (differences: "
                    f"{', '.join(diffs + [f'settings.{k}' for k in inner if 'settings' in diffs])}); rerun with the "
                    "same settings to resume, use another output folder, or pass --overwrite to start over")
        if folder.data_files():
            return (f"{folder.root} holds caption files without a {JOB_FILE}; use another output folder or pass "
                    "--overwrite to replace them")
    if not same:
        for path in folder.data_files():
            path.unlink()
        (folder.root / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(folder.root / "sidecars", ignore_errors=True)
        job = {**job, "versions": _versions(),
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        write_json(folder.job_file, job)
    removed = folder.clean_temporaries()
    if removed:
        _logger.info("removed %d temporary files of an interrupted run", removed)
    return None


def run_caption(config: CaptionJobConfig, *, captioner: Captioner | None = None,
                on_shard: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the job; under torchrun every rank calls this. Returns the manifest.

    Args:
        captioner: a built :class:`~.backends.base.Captioner` (default: built from ``config.backend``).
        on_shard: called with each partition's record once its files are on disk.
    """
    ctx = DistContext.from_env()
    try:
        return _run(config, ctx, captioner, on_shard)
    finally:
        ctx.close()


def _run(config: CaptionJobConfig, ctx: DistContext, captioner: Captioner | None, on_shard) -> dict[str, Any]:
    start = time.perf_counter()
    source = _source(config)
    if config.write_wds and source.kind != "webdataset":
        raise CaptionJobError("--write-wds rewrites webdataset shards; for a folder or table use --write-csv")
    if config.write_csv and source.kind == "webdataset":
        raise CaptionJobError("--write-csv needs image files on disk (folder or table input); for webdataset shards "
                              "use --write-wds")
    if captioner is None:
        captioner = build_captioner(config, ctx)
    count = _counter(config, captioner)
    clip = None
    if config.clip_model:
        device = torch.device(config.device) if config.device else ctx.default_device()
        clip = ClipScorer.load(config.clip_model, config.clip_pretrained, device)
    names = partition_names(source, config.shard_size)
    folder = JobFolder(config.output, names)
    job = _job_record(config, source, captioner, names)
    error = _prepare_folder(folder, job, config.overwrite) if ctx.rank == 0 else None
    error = ctx.broadcast(error)
    if error:
        raise CaptionJobError(error)
    ctx.barrier()

    row_keys = source.keys() if hasattr(source, "keys") else None

    def key_of(k: int, s: Sample) -> str:
        return row_keys[s.row] if row_keys is not None else s.key  # table/folder rows are global

    mine = [k for k in range(len(names)) if k % ctx.world_size == ctx.rank]
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for k in mine:
        done = folder.finished(k, job["digest"], source.partition_fingerprint(k, config.shard_size))
        if done is not None:
            records[k] = done
        else:
            todo.append(k)
    if records:
        _logger.info("rank %d: %d of its %d shards are already captioned; %d to go", ctx.rank, len(records),
                     len(mine), len(todo))
    sizes = [source.partition_size(k, config.shard_size) for k in todo]
    bar = None
    if config.progress and ctx.rank == 0:
        bar = progress(total=sum(sizes) if None not in sizes else None, unit="img", smoothing=0.1,
                       desc="caption" + (f" (rank 0 of {ctx.world_size})" if ctx.distributed else ""))
    runner = _Runner(config, captioner, count, clip, source, key_of, job["settings_hash"])
    try:
        for k in todo:
            t0 = time.perf_counter()
            rows, skipped, read = runner.partition(k, bar)
            n_wds = None
            if config.write_wds:
                captions = {r["key"]: (r.get("short_caption"), r.get("long_caption"),
                                       r.get("short_source") == "generated") for r in rows}
                n_wds = rewrite_tar(source.urls[k], folder.tar(k), captions)
            meta = {"digest": job["digest"], "inputs": source.partition_fingerprint(k, config.shard_size),
                    "partition": k, "name": names[k], "rows_read": read,
                    "captioned": len(rows), "skipped": skipped, "wds_samples": n_wds,
                    "flagged": sum(bool(r["flags"]) for r in rows)}
            write_sidecar(folder.sidecar(k), rows, meta)
            records[k] = meta
            _logger.debug("shard %s: %d rows in %.1f s", names[k], len(rows), time.perf_counter() - t0)
            if on_shard is not None:
                on_shard(meta)
    finally:
        if bar is not None:
            bar.close()
    stats = ctx.gather(dataclasses.asdict(runner.stats) | {"seconds": time.perf_counter() - runner.stats.started})
    gathered = ctx.gather(records)
    all_records = {k: r for part in gathered for k, r in part.items()}
    manifest = _manifest(config, job, all_records, stats, ctx, time.perf_counter() - start)
    if ctx.rank == 0:
        if config.write_wds:
            write_json(folder.root / "wds" / "sizes.json",
                       {f"{names[k]}.tar": r["wds_samples"] for k, r in sorted(all_records.items())})
        if config.write_csv:
            manifest["csv_rows"] = write_table(folder)
        write_json(folder.root / MANIFEST, manifest)
    ctx.barrier()
    return manifest


def write_table(folder: JobFolder) -> int:
    """``captions.tsv`` from the sidecars (vladva-train's CSV reader: tab-separated, ``filepath``, ``title`` = short,
    ``long_caption``); rows without a short caption cannot train the contrastive loss and are left out."""
    frames = [read_sidecar(folder.sidecar(k))[0] for k in range(len(folder.names))]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["filepath"])
    keep = df["short_caption"].notna()
    if (~keep).any():
        _logger.warning("%d rows have no short caption and are left out of captions.tsv (use --kind both)",
                        int((~keep).sum()))
    table = pd.DataFrame({"filepath": df["filepath"], "title": df["short_caption"],
                          "long_caption": df["long_caption"].fillna(""), "key": df["key"]})[keep]
    write_atomically(folder.root / "captions.tsv", lambda tmp: table.to_csv(tmp, sep="\t", index=False))
    return int(keep.sum())


def _manifest(config: CaptionJobConfig, job: dict[str, Any], records: dict[int, dict[str, Any]],
              stats: list[dict[str, Any]], ctx: DistContext, seconds: float) -> dict[str, Any]:
    skipped = [dict(s, shard=job["partitions"][k]) for k in sorted(records) for s in records[k].get("skipped", [])]
    captioned = sum(r["captioned"] for r in records.values())
    generated = sum(s["generated"] for s in stats)
    tokens = sum(s["tokens"] for s in stats)
    busy = max((s["seconds"] for s in stats), default=0.0)
    images = sum(s["images"] for s in stats)
    return {
        **{k: v for k, v in job.items() if k != "digest"},
        "counts": {"captioned": captioned, "skipped": len(skipped), "rows_read": captioned + len(skipped),
                   "flagged": sum(r.get("flagged", 0) for r in records.values()), "shards": len(records),
                   "shards_expected": len(job["partitions"])},
        "this_run": {"images": images, "captions_generated": generated, "tokens_generated": tokens,
                     "seconds": round(seconds, 3), "images_per_s": round(images / busy, 3) if busy else None,
                     "tokens_per_s": round(tokens / busy, 1) if busy else None, "world_size": ctx.world_size},
        "skipped": skipped,
        "versions": _versions(),
        "digest": job["digest"],
    }
