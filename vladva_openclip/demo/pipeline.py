"""The demo's stages, each on the project's real code paths.

world (``vladva_openclip.synth``: the evaluation sets on disk, the training scenes rendered once into packed tables)
-> zero-shot evaluation of the shipped captioner (``vladva_openclip.eval.evaluate``; also its generative scoring)
-> VladVA fine-tuning (``vladva_openclip.train.main``, i.e. open_clip_train's loop, reading the packed table) ->
evaluation -> the E5-V-style baseline (the same trainer on caption/paraphrase pairs) -> evaluation -> a CLIP trained
from scratch by open_clip_train's own ``main`` on the same scenes with the same batch size and steps -> evaluation ->
one summary table.

Every number of the table is a pure function of the configuration: fixed torch threads (one by default, which is
also the fastest choice on a 2-core machine that runs anything else), seeds, data order (seeded samplers), no
DataLoader workers. ``summary.json`` holds only such numbers; wall-clock times go to ``timings.json``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from . import baseline
from .runs import run_to_final_checkpoint
from .summary import SummaryTable
from .variants import Variant, get_variant

_logger = logging.getLogger(__name__)

MODEL_NAME = "vladva-tiny-llava"
#: settings that do not change any number of the table (left out of summary.json)
_NOT_RESULTS = ("out", "progress", "log_every", "parallel")


@dataclass
class DemoConfig:
    """Everything a demo run depends on.

    Attributes:
        out: output directory (world, training runs, results).
        n_train, n_test: scenes of the training split and of the evaluation sets (world seed ``world_seed``).
        short_captions, long_captions: the world's caption styles (:class:`~vladva_openclip.synth.WorldConfig`):
            ``coarse`` short captions name only part of the scene, ``compact`` long captions state all of it.
        batch_size, epochs: the training budget of EVERY trainer (steps = epochs * (n_train // batch_size)).
        lr: peak learning rate of the VladVA and E5-V-style fine-tunings (LoRA, soft prompts, logit_scale);
            clip_lr: of the CLIP baseline (all its weights, from scratch). All cosine with ``warmup`` steps.
        pretrained: the base the fine-tunings start from (the shipped generative captioner).
        variant: which VladVA configuration is fine-tuned (see :mod:`.variants`).
        baseline, e5v: also train and evaluate the CLIP baseline / the E5-V-style text-only fine-tune.
        generative: also score the pair tasks with the captioner's and the VladVA model's own likelihood (the
            diagnostic of RESULTS.md; off by default, it adds two rows and ~20 s).
        max_short_len, max_long_len: caption tokens kept (compact long captions fit 96 with their EOS).
        threads: torch CPU threads of each process; the numbers are identical across runs for the same count.
        parallel: train the baselines (E5-V-style, CLIP) in a second process beside the VladVA fine-tuning, on a
            machine with 2 or more cores (the same numbers either way).
    """

    out: Path = Path("vladva_demo_out")
    n_train: int = 4096
    n_test: int = 200
    world_seed: int = 0
    short_captions: str = "coarse"
    long_captions: str = "compact"
    batch_size: int = 64
    epochs: int = 10
    lr: float = 2e-3
    clip_lr: float = 1e-3
    warmup: int = 10
    seed: int = 0
    pretrained: str = "synth_captioner"
    variant: str = "vladva"
    baseline: bool = True
    e5v: bool = True
    generative: bool = False
    max_short_len: int = 32
    max_long_len: int = 96
    eval_batch_size: int = 200
    threads: int | None = 1
    parallel: bool = True
    log_every: int = 10
    progress: bool = True

    @property
    def steps(self) -> int:
        return self.epochs * (self.n_train // self.batch_size)

    def with_(self, **changes: Any) -> DemoConfig:
        return replace(self, **changes)

    def world_config(self):
        from ..synth import WorldConfig

        return WorldConfig(seed=self.world_seed, short_captions=self.short_captions,
                           long_captions=self.long_captions)

    def result_settings(self) -> dict[str, Any]:
        """The settings the table's numbers depend on (for summary.json)."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_RESULTS}


#: Named budgets (``vladva demo --preset``): overrides of DemoConfig's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": {"n_train": 2048, "n_test": 100, "epochs": 5, "e5v": False},
    "test": {"n_train": 128, "n_test": 24, "batch_size": 32, "epochs": 1, "warmup": 1, "log_every": 1},
}


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``--set KEY=JSON`` command-line items -> DemoConfig overrides (``["epochs=3"]`` -> ``{"epochs": 3}``)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=JSON, got {item!r}")
        overrides[key] = json.loads(value)
    return overrides


def preset(name: str, **overrides: Any) -> DemoConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown demo preset {name!r}; known: {', '.join(PRESETS)}")
    known = {f.name for f in fields(DemoConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"unknown demo settings {bad}; settings: {sorted(known)}")
    return DemoConfig(**{**PRESETS[name], **overrides})


# ---- data ----------------------------------------------------------------------------------------------------
def build_demo_world(cfg: DemoConfig, write_train: bool = True):
    """The world on disk under ``cfg.out/world``: the evaluation sets and (``write_train``) the training table
    with its PNG files and the caption/paraphrase columns (what ``vladva-train`` reads as CSV)."""
    from ..synth import build_world

    if cfg.n_train < cfg.batch_size:
        raise ValueError(f"n_train={cfg.n_train} makes no full batch of batch_size={cfg.batch_size}")
    return build_world(Path(cfg.out) / "world", n_train=cfg.n_train if write_train else 0, n_test=cfg.n_test,
                       config=cfg.world_config(), write_wds=False, text_pairs=True, progress=cfg.progress)


@dataclass
class DemoData:
    """The evaluation sets on disk and the training split in memory, packed once for the trainers.

    Attributes:
        paths: the evaluation sets (:func:`build_demo_world` without the training table).
        images: uint8 ``[N, 3, S, S]`` training scenes; shorts: their short captions (what the CLIP trains on).
        tables: ``{"vladva": packed table of (short, long), "text_pairs": of (caption, paraphrase)}``.
        pixels, texts: the VladVA table's preprocessed images ``[N, 3, S, S]`` and packed ids ``[N, 2, L]``.
    """

    paths: Any
    images: torch.Tensor
    shorts: list[str]
    tables: dict[str, Path]
    pixels: torch.Tensor
    texts: torch.Tensor


def prepare_demo_data(cfg: DemoConfig) -> DemoData:
    """Render the training split once and pack it for the trainers (see :mod:`vladva_openclip.train.packed`)."""
    import open_clip

    from .. import install
    from ..synth import World
    from ..train._common import CaptionPacker
    from ..train.packed import PackedTableDataset, write_packed_table
    from .pretrain_captioner import render_split

    paths = build_demo_world(cfg, write_train=False)
    world = World(cfg.world_config())
    images, shorts, longs = render_split(world, "train", cfg.n_train, progress=cfg.progress)
    pairs = [world.text_pair("train", i) for i in range(cfg.n_train)]
    install()
    _, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME)
    tok = open_clip.get_tokenizer(MODEL_NAME)
    data_dir = Path(cfg.out) / "data"
    packer = CaptionPacker(tok, cfg.max_short_len, cfg.max_long_len)
    tables = {
        "vladva": write_packed_table(data_dir / "train.safetensors", images, shorts, longs, packer,
                                     preprocess=preprocess),
        "text_pairs": write_packed_table(data_dir / "train_text_pairs.safetensors", images, *zip(*pairs),
                                         CaptionPacker(tok, cfg.max_short_len, cfg.max_long_len, pair_text=True),
                                         preprocess=preprocess),
    }
    packed = PackedTableDataset(tables["vladva"], preprocess, packer)
    return DemoData(paths=paths, images=images, shorts=shorts, tables=tables, pixels=packed.pixels,
                    texts=packed.texts)


def eval_tasks(paths) -> list[dict[str, Any]]:
    """The evaluator's task specs for a built world: retrieval, SugarCrepe, SugarCrepe++, Winoground."""
    return [
        {"task": "retrieval", "data": str(paths.retrieval_json), "images": str(paths.retrieval_json.parent),
         "name": "synth"},
        {"task": "sugarcrepe", "data": str(paths.sugarcrepe_dir), "images": str(paths.eval_images)},
        {"task": "sugarcrepe_pp", "data": str(paths.sugarcrepe_pp_dir), "images": str(paths.eval_images)},
        {"task": "winoground", "data": str(paths.winoground_dir)},
    ]


def generative_tasks(paths) -> list[dict[str, Any]]:
    """The pair tasks generative scoring applies to (every one but retrieval)."""
    return [t for t in eval_tasks(paths) if t["task"] != "retrieval"]


# ---- training and loading ----------------------------------------------------------------------------------
def train_variant(variant: Variant, train_data: str | Path, cfg: DemoConfig, logs: Path, name: str,
                  on_step: Callable[[], None] | None = None) -> Path:
    """Fine-tune ``variant`` from ``cfg.pretrained`` with ``vladva-train`` (open_clip_train's loop) on
    ``train_data`` (a packed ``.safetensors`` table, or the world's CSV/TSV table); returns the final checkpoint
    (trainable tensors only). ``on_step``: called between optimizer steps (``vladva_openclip.train.main``)."""
    from ..synth.build import PAIR_COLUMNS
    from ..train.main import main as train_main

    short_key, long_key = PAIR_COLUMNS if variant.text_pairs else ("short_caption", "long_caption")
    argv = [
        "--model", MODEL_NAME, "--pretrained", cfg.pretrained, "--train-data", str(train_data),
        "--csv-img-key", "filepath", "--csv-caption-key", short_key, "--long-caption-key", long_key,
        "--csv-separator", "\t", "--batch-size", str(cfg.batch_size), "--epochs", str(cfg.epochs),
        "--lr", str(cfg.lr), "--warmup", str(cfg.warmup), "--workers", "0", "--precision", "fp32",
        "--max-short-len", str(cfg.max_short_len), "--max-long-len", str(cfg.max_long_len),
        "--logs", str(logs), "--name", name, "--report-to", "", "--seed", str(cfg.seed),
        "--log-every-n-steps", str(cfg.log_every), "--save-frequency", str(cfg.epochs),
        *variant.train_flags(), *(["--progress"] if cfg.progress else []),
    ]
    return run_to_final_checkpoint(train_main, argv, logs, name, cfg.epochs, f"vladva-train for {variant.label}",
                                   on_step=on_step)


def load_variant(variant: Variant, cfg: DemoConfig, checkpoint: Path | None = None):
    """(model in eval mode, val preprocess, tokenizer): the captioner base with ``variant``'s structure, and the
    fine-tuned trainables of ``checkpoint`` if given."""
    import open_clip

    from .. import install, load_adapter

    install()
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=cfg.pretrained,
                                                                 **variant.model_kwargs())
    if checkpoint is not None:
        # The checkpoint holds only what trained; the frozen base is the captioner's, loaded above.
        load_adapter(model, checkpoint)
    return model.eval(), preprocess, open_clip.get_tokenizer(MODEL_NAME)


@torch.no_grad()
def training_loss(model, data: DemoData, n: int = 64) -> dict[str, float]:
    """VladVA's two training losses (contrastive at the model's temperature, AR) on the first ``n`` training samples
    exactly as the trainer sees them, in eval mode: a fixed yardstick for before/after fine-tuning."""
    from ..loss import VladVALoss

    out = model(image=data.pixels[:n], text=data.texts[:n])
    losses = VladVALoss(ar_weight=1.0)(**out, output_dict=True)
    return {k: round(float(v), 4) for k, v in losses.items()}


# ---- the whole demo ----------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    table: SummaryTable
    report: Any  # eval.report.Report with every metric of every model
    seconds: dict[str, float] = field(default_factory=dict)
    losses: dict[str, dict[str, float]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


class _Stages:
    """Numbered stage messages, wall-clock and CPU seconds (this process's) per stage. CPU seconds hardly depend on
    what else the machine runs: they tell how long a stage takes on an idle core."""

    def __init__(self, total: int, announce: Callable[[str], None], first: int = 0, tag: str = ""):
        self.total, self.n, self.announce, self.tag = total, first, announce, tag
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def run(self, key: str, title: str, fn: Callable[[], Any]) -> Any:
        self.n += 1
        self.announce(f"[{self.n}/{self.total}]{self.tag} {title}")
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.seconds[key] = round(time.perf_counter() - start, 1)
        self.cpu_seconds[key] = round(time.process_time() - cpu, 1)
        self.announce(f"[{self.n}/{self.total}]{self.tag} {title}: done in {self.seconds[key]:.0f} s")
        return result


class _Rows:
    """Evaluated models in the order they are added: ``(label, results, extra)``; the table's rows."""

    def __init__(self, cfg: DemoConfig, tasks: list[dict[str, Any]], generative: list[dict[str, Any]]):
        self.cfg, self.tasks, self.generative = cfg, tasks, generative
        self.items: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def evaluate(self, label: str, model, preprocess, tokenizer, scoring: str = "embedding", **extra) -> None:
        from ..eval.api import evaluate

        results = evaluate(model, preprocess, tokenizer, self.tasks if scoring == "embedding" else self.generative,
                           device="cpu", batch_size=self.cfg.eval_batch_size, progress=self.cfg.progress,
                           scoring=scoring)
        self.items.append((f"{label}, generative scoring" if scoring == "generative" else label, results, extra))


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set for the block (None: leave it), then restored."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(cfg: DemoConfig, announce: Callable[[str], None] | None = None) -> DemoResult:
    """Run every stage; writes ``summary.md``/``summary.json`` (the table), ``results.md``/``results.json`` (every
    metric) and ``timings.json`` (wall-clock per stage) under ``cfg.out``."""
    with fixed_threads(cfg.threads):
        torch.manual_seed(cfg.seed)  # nothing should draw from the global generator; if anything does, it is seeded
        return _run_demo(cfg, announce or _logger.info)


@contextlib.contextmanager
def clip_baseline(cfg: DemoConfig) -> Iterator[tuple[str, Any]]:
    """The demo's CLIP from scratch (config and word pieces under ``cfg.out/baseline``), registered with open_clip
    for the block: yields (its model name, its :class:`~.baseline.TrainSettings` for ``cfg``'s budget)."""
    out = Path(cfg.out) / "baseline"
    config_file = baseline.write_model_config(out, baseline.write_clip_tokenizer(out / "tokenizer"))
    settings = baseline.TrainSettings(batch_size=cfg.batch_size, epochs=cfg.epochs, lr=cfg.clip_lr,
                                      warmup=cfg.warmup, seed=cfg.seed, log_every=cfg.log_every)
    with baseline.registered_config(config_file) as name:
        yield name, settings


def _side_stages(cfg: DemoConfig, data: DemoData, rows: _Rows, stages: _Stages) -> None:
    """The baselines: the E5-V-style fine-tune and the CLIP from scratch, each trained and evaluated."""
    logs = Path(cfg.out) / "runs"
    if cfg.e5v:
        e5v = get_variant("e5v")
        ckpt = stages.run("e5v_train", f"{e5v.label}: {cfg.steps} steps x {cfg.batch_size}",
                          lambda: train_variant(e5v, data.tables["text_pairs"], cfg, logs, "e5v"))
        stages.run("e5v_eval", "evaluation of the E5-V-style model",
                   lambda: rows.evaluate(e5v.label, *load_variant(e5v, cfg, ckpt), steps=cfg.steps))
    if cfg.baseline:
        with clip_baseline(cfg) as (clip_name, settings):
            clip_ckpt = stages.run(
                "clip_train", f"CLIP baseline from scratch (open_clip_train): {cfg.steps} steps x {cfg.batch_size}",
                lambda: baseline.train_clip_on_tensors(data.images, data.shorts, data.pixels, logs,
                                                       "clip-baseline", settings, clip_name))

            def clip_eval_stage() -> None:
                model, preprocess, tokenizer = baseline.load_clip(clip_name, clip_ckpt)
                rows.evaluate(f"CLIP from scratch ({baseline.count_clip_parameters(model) / 1e6:.2f}M params)",
                              model, preprocess, tokenizer, steps=cfg.steps)

            stages.run("clip_eval", "evaluation of the CLIP baseline", clip_eval_stage)


def _side_lane_process(cfg: DemoConfig, data: DemoData, first: int, total: int, result_file: str) -> None:
    """The baselines in a second process (spawned), beside the VladVA fine-tuning: results to ``result_file``."""
    import sys

    from .. import install

    install()
    torch.set_num_threads(cfg.threads or 1)
    rows = _Rows(cfg, eval_tasks(data.paths), generative_tasks(data.paths))
    stages = _Stages(total, _logger.info, first=first, tag=" (second process)")
    try:
        _side_stages(cfg.with_(progress=False), data, rows, stages)
    except BaseException as err:  # the parent reports it with this process's exit code
        print(f"demo baselines failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    Path(result_file).write_text(json.dumps({"rows": rows.items, "seconds": stages.seconds,
                                             "cpu_seconds": stages.cpu_seconds}))


class _ThreadsWhenDone:
    """Between training steps: once the baselines' process has ended, try giving this process its core too.

    The second process finishes long before the VladVA fine-tuning (its two trainers cost about half as much), so on
    an idle machine one core would idle for the rest of the run. On a busy one, two threads fight the neighbour for
    the cores and every step waits for the slower thread (the default demo took 417 s instead of ~300 s beside one
    CPU-bound process), so the switch is a trial: ``probe`` steps at the old thread count, ``probe`` at the new, and
    the new one stays only if its median step is clearly faster. torch's CPU kernels give bit-identical results at 1
    and 2 threads on this project's machines (the demo's determinism test compares whole runs), so neither the trial
    nor its outcome changes a number. It runs in the training thread because torch's thread count is per thread.
    """

    def __init__(self, process, threads: int, probe: int = 4, gain: float = 0.85,
                 clock: Callable[[], float] = time.perf_counter):
        self.process, self.threads, self.probe, self.gain, self.clock = process, threads, probe, gain, clock
        self.base = torch.get_num_threads()
        self.phase = "wait"  # -> "before" (timing the old count) -> "after" (timing the new) -> "done"
        self.last: float | None = None
        self.times: dict[str, list[float]] = {"before": [], "after": []}
        self.done = False  # True when the wider count was kept

    def __call__(self) -> None:
        step = None if self.last is None else self.clock() - self.last
        if self.phase == "wait":
            if not self.process.is_alive():
                self.phase = "before"
        elif self.phase in self.times:
            if step is not None:
                self.times[self.phase].append(round(step, 4))
            if len(self.times[self.phase]) >= self.probe:
                self._next()
        self.last = self.clock()  # the trial's own work is not part of the next step

    def _next(self) -> None:
        import statistics

        if self.phase == "before":
            self.phase = "after"
            torch.set_num_threads(self.threads)
            return
        before, after = (statistics.median(self.times[k]) for k in ("before", "after"))
        self.phase, self.done = "done", after < self.gain * before
        if not self.done:
            torch.set_num_threads(self.base)
        _logger.info("the baselines' process has ended: %d torch threads from now on (median step %.3f s at %d, "
                     "%.3f s at %d)", self.threads if self.done else self.base, before, self.base, after,
                     self.threads)


def _use_second_process(cfg: DemoConfig) -> bool:
    import os

    return cfg.parallel and (cfg.e5v or cfg.baseline) and (os.cpu_count() or 1) >= 2


def _run_demo(cfg: DemoConfig, announce: Callable[[str], None]) -> DemoResult:
    import multiprocessing

    from ..eval.report import Report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "runs"
    variant = get_variant(cfg.variant)
    zero_shot = get_variant("zero-shot")
    n_main, n_side = 4, 2 * cfg.e5v + 2 * cfg.baseline
    stages = _Stages(n_main + n_side + 1, announce)
    start = time.perf_counter()
    losses: dict[str, dict[str, float]] = {}

    data = stages.run("world", f"synthetic world ({cfg.short_captions} short captions, {cfg.long_captions} long "
                               f"ones): {cfg.n_train} training scenes, {cfg.n_test} test scenes",
                      lambda: prepare_demo_data(cfg))
    rows = _Rows(cfg, eval_tasks(data.paths), generative_tasks(data.paths))
    side = None
    if _use_second_process(cfg):
        # The baselines train in a second process, one thread each: the two cores work at once, and every number
        # is still a function of the settings alone (each process has its fixed thread count and seeds).
        side_file = out / ".baselines.json"
        side_file.unlink(missing_ok=True)
        side = multiprocessing.get_context("spawn").Process(
            target=_side_lane_process, args=(cfg, data, n_main, stages.total, str(side_file)), daemon=False)
        side.start()

    def zero_shot_stage() -> None:
        model, preprocess, tokenizer = load_variant(zero_shot, cfg)
        losses["before"] = training_loss(model, data)
        rows.evaluate(f"tiny LLaVA captioner, {zero_shot.label}", model, preprocess, tokenizer, steps=0)
        if cfg.generative:
            from .pretrain_captioner import build_captioner

            # The captioner scores captions after the instruction it was trained to answer.
            captioner, _, preprocess = build_captioner(cfg.pretrained)
            rows.evaluate("tiny LLaVA captioner", captioner.eval(), preprocess, captioner.tokenizer,
                          scoring="generative", steps=0)

    stages.run("zero_shot_eval", "zero-shot: the generative captioner as an embedding model (handcrafted prompts)"
               + (" and as a generative scorer" if cfg.generative else ""), zero_shot_stage)
    table_key = "text_pairs" if variant.text_pairs else "vladva"
    widen = None if side is None else _ThreadsWhenDone(side, 2 * (cfg.threads or 1))
    ckpt = stages.run("vladva_train", f"VladVA fine-tuning, {variant.label}: {cfg.steps} steps x {cfg.batch_size}",
                      lambda: train_variant(variant, data.tables[table_key], cfg, logs, f"vladva-{cfg.variant}",
                                            on_step=widen))

    def vladva_eval_stage() -> None:
        model, preprocess, tokenizer = load_variant(variant, cfg, ckpt)
        losses["after"] = training_loss(model, data)
        label = f"VladVA {variant.label}"
        rows.evaluate(label, model, preprocess, tokenizer, steps=cfg.steps)
        if cfg.generative:
            rows.evaluate(label, model, preprocess, tokenizer, scoring="generative", steps=cfg.steps)

    stages.run("vladva_eval", "evaluation of the fine-tuned model", vladva_eval_stage)

    if side is None:
        _side_stages(cfg, data, rows, stages)
    else:
        t0 = time.perf_counter()
        side.join()
        stages.seconds["wait_for_second_process"] = round(time.perf_counter() - t0, 1)
        if side.exitcode != 0 or not side_file.is_file():
            raise RuntimeError(f"the baselines' process failed (exit code {side.exitcode}); its message is above, "
                               f"the trainers' logs are under {logs}")
        side_result = json.loads(side_file.read_text())
        side_file.unlink()
        rows.items.extend(tuple(item) for item in side_result["rows"])
        stages.seconds.update(side_result["seconds"])
        stages.cpu_seconds.update(side_result["cpu_seconds"])
        stages.n += n_side
        announce(f"[{n_main + 1}-{n_main + n_side}/{stages.total}] the baselines, trained in a second process "
                 f"meanwhile: " + ", ".join(f"{k} {v:.0f} s" for k, v in side_result["seconds"].items()))

    report = Report(meta={"demo_config": cfg.result_settings(), "steps": cfg.steps})
    table = SummaryTable(n_test=cfg.n_test)
    for label, results, extra in rows.items:
        for r in results.values():
            report.add(label, r)
        table.add(label, results, **extra)

    def write() -> dict[str, str]:
        seconds = {**stages.seconds, "total": round(time.perf_counter() - start, 1)}
        report.meta.update(seconds=seconds, losses=losses)
        json_path, md_path = report.save(out, stem="results")
        summary = {"config": cfg.result_settings(), "steps": cfg.steps, "losses": losses, "rows": table.rows,
                   "columns": [c.header for c in table.columns]}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "summary.md").write_text(table.to_markdown() + "\n")
        timings = {"seconds": seconds, "cpu_seconds": stages.cpu_seconds, "second_process": side is not None,
                   "threads": cfg.threads, "threads_after_second_process": widen.threads if widen and widen.done
                   else None, "thread_trial_step_s": widen.times if widen else None, "machine": machine()}
        (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        return {"summary_md": str(out / "summary.md"), "summary_json": str(out / "summary.json"),
                "results_md": str(md_path), "results_json": str(json_path), "timings": str(out / "timings.json")}

    files = stages.run("write", "writing the tables", write)
    seconds = {**stages.seconds, "total": round(time.perf_counter() - start, 1)}
    return DemoResult(table=table, report=report, seconds=seconds, losses=losses, files=files)


def machine() -> dict[str, Any]:
    """What the timings were measured on."""
    import os

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_1_5_15": None if load is None else [round(x, 2) for x in load]}
