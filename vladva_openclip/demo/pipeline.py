"""The demo's stages, each on the project's real code paths.

world (``vladva_openclip.synth.build_world``) -> zero-shot evaluation of the shipped captioner
(``vladva_openclip.eval.evaluate``) -> VladVA fine-tuning (``vladva_openclip.train.main``, i.e. open_clip_train's
loop) -> evaluation -> a CLIP trained from scratch by open_clip_train's own ``main`` on the same table with the same
batch size and steps -> evaluation -> one summary table.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
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


@dataclass
class DemoConfig:
    """Everything a demo run depends on.

    Attributes:
        out: output directory (world, training runs, results).
        n_train, n_test: scenes of the training table and of the evaluation sets (world seed ``world_seed``).
        batch_size, epochs: the training budget of BOTH trainers (steps = epochs * (n_train // batch_size)).
        lr: peak learning rate of the VladVA fine-tuning (LoRA, soft prompts, logit_scale); clip_lr: of the
            CLIP baseline (all its weights, from scratch). Both cosine with ``warmup`` steps.
        pretrained: the base the fine-tuning starts from (the shipped generative captioner).
        variant: which VladVA configuration is fine-tuned (see :mod:`.variants`).
        baseline: also train and evaluate the CLIP baseline.
        threads: torch CPU threads (None: torch's default).
    """

    out: Path = Path("vladva_demo_out")
    n_train: int = 4096
    n_test: int = 200
    world_seed: int = 0
    batch_size: int = 64
    epochs: int = 10
    lr: float = 2e-3
    clip_lr: float = 1e-3
    warmup: int = 10
    seed: int = 0
    pretrained: str = "synth_captioner"
    variant: str = "vladva"
    baseline: bool = True
    max_long_len: int = 128
    eval_batch_size: int = 100
    threads: int | None = None
    log_every: int = 10
    progress: bool = True

    @property
    def steps(self) -> int:
        return self.epochs * (self.n_train // self.batch_size)

    def with_(self, **changes: Any) -> DemoConfig:
        return replace(self, **changes)


#: Named budgets (``vladva demo --preset``): overrides of DemoConfig's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": {"n_train": 2048, "epochs": 6},
    "test": {"n_train": 128, "n_test": 24, "batch_size": 32, "epochs": 1, "warmup": 1, "max_long_len": 64,
             "log_every": 1},
}


def preset(name: str, **overrides: Any) -> DemoConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown demo preset {name!r}; known: {', '.join(PRESETS)}")
    known = {f.name for f in fields(DemoConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"unknown demo settings {bad}; settings: {sorted(known)}")
    return DemoConfig(**{**PRESETS[name], **overrides})


# ---- stages ------------------------------------------------------------------------------------------------
def build_demo_world(cfg: DemoConfig):
    """The training table and the evaluation sets (PNG files + tables/JSON) under ``cfg.out/world``."""
    from ..synth import build_world

    if cfg.n_train < cfg.batch_size:
        raise ValueError(f"n_train={cfg.n_train} makes no full batch of batch_size={cfg.batch_size}")
    return build_world(Path(cfg.out) / "world", n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.world_seed,
                       write_wds=False, progress=cfg.progress)


def eval_tasks(paths) -> list[dict[str, Any]]:
    """The evaluator's task specs for a built world: retrieval, SugarCrepe, SugarCrepe++, Winoground."""
    return [
        {"task": "retrieval", "data": str(paths.retrieval_json), "images": str(paths.retrieval_json.parent),
         "name": "synth"},
        {"task": "sugarcrepe", "data": str(paths.sugarcrepe_dir), "images": str(paths.eval_images)},
        {"task": "sugarcrepe_pp", "data": str(paths.sugarcrepe_pp_dir), "images": str(paths.eval_images)},
        {"task": "winoground", "data": str(paths.winoground_dir)},
    ]


def train_variant(variant: Variant, train_csv: Path, cfg: DemoConfig, logs: Path, name: str) -> Path:
    """Fine-tune ``variant`` from ``cfg.pretrained`` with ``vladva-train`` (open_clip_train's loop); returns the
    final checkpoint (trainable tensors only)."""
    from ..train.main import main as train_main

    argv = [
        "--model", MODEL_NAME, "--pretrained", cfg.pretrained, "--dataset-type", "csv",
        "--train-data", str(train_csv), "--csv-img-key", "filepath", "--csv-caption-key", "short_caption",
        "--long-caption-key", "long_caption", "--csv-separator", "\t",
        "--batch-size", str(cfg.batch_size), "--epochs", str(cfg.epochs), "--lr", str(cfg.lr),
        "--warmup", str(cfg.warmup), "--workers", "0", "--precision", "fp32", "--max-long-len", str(cfg.max_long_len),
        "--logs", str(logs), "--name", name, "--report-to", "", "--seed", str(cfg.seed),
        "--log-every-n-steps", str(cfg.log_every), "--save-frequency", str(cfg.epochs),
        *variant.train_flags(), *(["--progress"] if cfg.progress else []),
    ]
    return run_to_final_checkpoint(train_main, argv, logs, name, cfg.epochs, f"vladva-train for {variant.label}")


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
def training_loss(model, preprocess, tokenizer, train_csv: Path, cfg: DemoConfig, n: int = 64) -> dict[str, float]:
    """VladVA's two training losses (contrastive at the model's temperature, AR) on the first ``n`` training rows,
    in eval mode: a fixed yardstick for before/after fine-tuning."""
    import pandas as pd
    from PIL import Image

    from ..loss import VladVALoss

    df = pd.read_csv(train_csv, sep="\t", dtype=str, keep_default_na=False).head(n)
    images = torch.stack([preprocess(Image.open(Path(train_csv).parent / p).convert("RGB")) for p in df.filepath])
    short = tokenizer(list(df.short_caption), context_length=cfg.max_long_len)
    long = tokenizer.long_captions(list(df.long_caption), context_length=cfg.max_long_len)
    out = model(image=images, text=torch.stack([short, long], dim=1))
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
    """Numbered stage messages and wall-clock per stage."""

    def __init__(self, total: int, announce: Callable[[str], None]):
        self.total, self.n, self.announce = total, 0, announce
        self.seconds: dict[str, float] = {}

    def run(self, key: str, title: str, fn: Callable[[], Any]) -> Any:
        self.n += 1
        self.announce(f"[{self.n}/{self.total}] {title}")
        start = time.perf_counter()
        result = fn()
        self.seconds[key] = round(time.perf_counter() - start, 1)
        self.announce(f"[{self.n}/{self.total}] {title}: done in {self.seconds[key]:.0f} s")
        return result


def run_demo(cfg: DemoConfig, announce: Callable[[str], None] | None = None) -> DemoResult:
    """Run every stage; writes ``summary.md``/``summary.json`` (the table) and ``results.md``/``results.json``
    (every metric) under ``cfg.out``."""
    from ..eval.api import evaluate
    from ..eval.report import Report

    announce = announce or _logger.info
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "runs"
    variant = get_variant(cfg.variant)
    zero_shot = get_variant("zero-shot")
    stages = _Stages(7 if cfg.baseline else 5, announce)
    start = time.perf_counter()
    report = Report(meta={"demo_config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                          "steps": cfg.steps})
    table = SummaryTable(n_test=cfg.n_test)
    losses: dict[str, dict[str, float]] = {}

    paths = stages.run("world", f"synthetic world: {cfg.n_train} training scenes, {cfg.n_test} test scenes",
                       lambda: build_demo_world(cfg))
    tasks = eval_tasks(paths)

    def evaluate_into(label: str, model, preprocess, tokenizer, **extra) -> None:
        results = evaluate(model, preprocess, tokenizer, tasks, device="cpu", batch_size=cfg.eval_batch_size,
                           progress=cfg.progress)
        for r in results.values():
            report.add(label, r)
        table.add(label, results, **extra)

    def zero_shot_stage() -> None:
        model, preprocess, tokenizer = load_variant(zero_shot, cfg)
        losses["before"] = training_loss(model, preprocess, tokenizer, paths.train_csv, cfg)
        evaluate_into(f"tiny LLaVA captioner, {zero_shot.label}", model, preprocess, tokenizer, steps=0)

    stages.run("zero_shot_eval", "zero-shot: the generative captioner as an embedding model (handcrafted prompts)",
               zero_shot_stage)
    ckpt = stages.run("vladva_train", f"VladVA fine-tuning, {variant.label}: {cfg.steps} steps x {cfg.batch_size}",
                      lambda: train_variant(variant, paths.train_csv, cfg, logs, f"vladva-{cfg.variant}"))

    def vladva_eval_stage() -> None:
        model, preprocess, tokenizer = load_variant(variant, cfg, ckpt)
        losses["after"] = training_loss(model, preprocess, tokenizer, paths.train_csv, cfg)
        evaluate_into(f"VladVA {variant.label}", model, preprocess, tokenizer, steps=cfg.steps)

    stages.run("vladva_eval", "evaluation of the fine-tuned model", vladva_eval_stage)

    if cfg.baseline:
        tok_dir = baseline.write_clip_tokenizer(out / "baseline" / "tokenizer")
        config_file = baseline.write_model_config(out / "baseline", tok_dir)
        table_abs = baseline.absolute_table(paths.train_csv, out / "baseline" / "train_abs.tsv")
        settings = baseline.TrainSettings(batch_size=cfg.batch_size, epochs=cfg.epochs, lr=cfg.clip_lr,
                                          warmup=cfg.warmup, seed=cfg.seed, log_every=cfg.log_every)
        with baseline.registered_config(config_file) as clip_name:
            clip_ckpt = stages.run(
                "clip_train", f"CLIP baseline from scratch (open_clip_train): {cfg.steps} steps x {cfg.batch_size}",
                lambda: baseline.train_clip(table_abs, logs, "clip-baseline", settings, clip_name))

            def clip_eval_stage() -> None:
                model, preprocess, tokenizer = baseline.load_clip(clip_name, clip_ckpt)
                evaluate_into(f"CLIP from scratch ({baseline.count_clip_parameters(model) / 1e6:.2f}M params)",
                              model, preprocess, tokenizer, steps=cfg.steps)

            stages.run("clip_eval", "evaluation of the CLIP baseline", clip_eval_stage)

    def write() -> dict[str, str]:
        seconds = {**stages.seconds, "total": round(time.perf_counter() - start, 1)}
        report.meta.update(seconds=seconds, losses=losses)
        json_path, md_path = report.save(out, stem="results")
        summary = {"config": report.meta["demo_config"], "steps": cfg.steps, "seconds": seconds, "losses": losses,
                   "rows": table.rows, "columns": [c.header for c in table.columns]}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "summary.md").write_text(table.to_markdown() + "\n")
        return {"summary_md": str(out / "summary.md"), "summary_json": str(out / "summary.json"),
                "results_md": str(md_path), "results_json": str(json_path)}

    files = stages.run("write", "writing the tables", write)
    seconds = {**stages.seconds, "total": round(time.perf_counter() - start, 1)}
    return DemoResult(table=table, report=report, seconds=seconds, losses=losses, files=files)
