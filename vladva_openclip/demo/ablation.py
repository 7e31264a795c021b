"""The paper's Table 4 in miniature: zero-shot / + soft prompt / + LoRA / + LoRA + soft prompt / + AR loss, and the
E5-V-style baseline, each fine-tuned from the shipped captioner with the demo's budget, over several seeds (seed s:
world seed s, training seed s, so both the data and its order change), reported as mean and standard deviation.

    python -m vladva_openclip.demo.ablation --seeds 0 1 2 --out ablation_out
    python -m vladva_openclip.demo.ablation --seeds 0 1 2 --set short_captions='"detailed"' --out detailed_out

writes ``ablation.json`` (every metric of every run), ``ablation.md`` (the mean ± std table beside the paper's
numbers) and ``ablation.png`` (the plot; needs matplotlib, the ``bench`` extra). Seeds can run in separate
processes (``--seeds 1 --out part1``, ...) and be merged: ``--merge part0 part1 part2 --out ablation_out``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .pipeline import (
    DemoConfig,
    clip_baseline,
    eval_tasks,
    fixed_threads,
    load_variant,
    parse_settings,
    prepare_demo_data,
    preset,
    train_variant,
)
from .summary import SUMMARY_COLUMNS, pick
from .variants import VARIANTS, get_variant

#: row key -> label: the VladVA configurations and, beside them, the CLIP trained from scratch
CLIP_KEY = "clip"
LABELS: dict[str, str] = {**{k: v.label for k, v in VARIANTS.items()}, CLIP_KEY: "CLIP from scratch (0.39M params)"}

_logger = logging.getLogger(__name__)

# The paper's Table 4 (LLaVA-1.5-7B, 1M training samples): SugarCrepe replace/swap/add averages, Flickr30K R@1.
PAPER_TABLE4: dict[str, dict[str, float]] = {
    "zero-shot": {"SC replace": 81.9, "SC swap": 59.8, "SC add": 64.7, "T2I R@1": 59.6, "I2T R@1": 65.6},
    "soft-prompt": {"SC replace": 86.4, "SC swap": 66.9, "SC add": 89.3, "T2I R@1": 76.7, "I2T R@1": 91.7},
    "lora": {"SC replace": 87.0, "SC swap": 69.8, "SC add": 88.8, "T2I R@1": 79.1, "I2T R@1": 91.4},
    "lora-soft-prompt": {"SC replace": 87.1, "SC swap": 72.0, "SC add": 88.6, "T2I R@1": 79.6, "I2T R@1": 92.9},
    "vladva": {"SC replace": 89.5, "SC swap": 75.5, "SC add": 89.5, "T2I R@1": 80.6, "I2T R@1": 91.8},
}
PAPER_COLUMNS = ("T2I R@1", "I2T R@1", "SC replace", "SC swap", "SC add")


@dataclass
class AblationConfig:
    out: Path = Path("ablation_out")
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = (*VARIANTS, CLIP_KEY)
    preset: str = "default"
    overrides: dict[str, Any] = field(default_factory=dict)


def run_one_seed(base: DemoConfig, seed: int, variants: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every variant on world ``seed`` with training seed ``seed``; one record per variant."""
    from ..eval.api import evaluate

    cfg = base.with_(out=Path(base.out) / f"seed{seed}", world_seed=seed, seed=seed)
    data = prepare_demo_data(cfg)
    tasks = eval_tasks(data.paths)
    records = []
    for key in variants:
        start = time.perf_counter()
        if key == CLIP_KEY:
            with _trained_clip(cfg, data) as (model, preprocess, tokenizer):
                train_s = time.perf_counter() - start
                results = evaluate(model, preprocess, tokenizer, tasks, device="cpu",
                                   batch_size=cfg.eval_batch_size, progress=cfg.progress)
        else:
            variant = get_variant(key)
            table = data.tables["text_pairs" if variant.text_pairs else "vladva"]
            ckpt = train_variant(variant, table, cfg, Path(cfg.out) / "runs", key) if variant.trained else None
            train_s = time.perf_counter() - start
            model, preprocess, tokenizer = load_variant(variant, cfg, ckpt)
            results = evaluate(model, preprocess, tokenizer, tasks, device="cpu", batch_size=cfg.eval_batch_size,
                               progress=cfg.progress)
        records.append({"seed": seed, "variant": key, "label": LABELS[key], "train_seconds": round(train_s, 1),
                        "summary": pick(results), "metrics": {k: v["metrics"] for k, v in results.items()}})
        _logger.info("seed %d, %s: %s", seed, LABELS[key], records[-1]["summary"])
    return records


@contextlib.contextmanager
def _trained_clip(cfg: DemoConfig, data):
    """The demo's CLIP baseline trained on this seed's scenes; yields (model, preprocess, tokenizer)."""
    from . import baseline

    with clip_baseline(cfg) as (name, settings):
        ckpt = baseline.train_clip_on_tensors(data.images, data.shorts, data.pixels, Path(cfg.out) / "runs",
                                              CLIP_KEY, settings, name)
        yield baseline.load_clip(name, ckpt)


def aggregate(records: list[dict[str, Any]], variants: tuple[str, ...]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{variant: {column: (mean, std)}}`` over seeds (std: sample standard deviation; 0 for one seed)."""
    out = {}
    for key in variants:
        rows = [r["summary"] for r in records if r["variant"] == key]
        stats = {}
        for c in SUMMARY_COLUMNS:
            vals = [row[c.header] for row in rows if row.get(c.header) is not None]
            if vals:
                stats[c.header] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out[key] = stats
    return out


def markdown_table(stats: dict[str, dict[str, tuple[float, float]]], columns: tuple[str, ...] | None = None) -> str:
    columns = columns or tuple(c.header for c in SUMMARY_COLUMNS)
    lines = ["| Config | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for key, s in stats.items():
        cells = [f"{s[c][0]:.1f} ± {s[c][1]:.1f}" if c in s else "–" for c in columns]
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def direction_table(stats: dict[str, dict[str, tuple[float, float]]]) -> str:
    """Each step's change (ours, mean over seeds; paper) for the paper's Table 4 columns."""
    lines = ["| Step | " + " | ".join(f"{c} (ours / paper)" for c in PAPER_COLUMNS) + " |",
             "|---|" + "---:|" * len(PAPER_COLUMNS)]
    # The paper's last step adds the AR loss to LoRA + soft prompt; the first three each start from zero-shot.
    steps = [("zero-shot", k) for k in ("soft-prompt", "lora", "lora-soft-prompt") if k in stats]
    if "vladva" in stats and "lora-soft-prompt" in stats:
        steps.append(("lora-soft-prompt", "vladva"))
    for a, b in steps:
        cells = []
        for c in PAPER_COLUMNS:
            ours = stats[b][c][0] - stats[a][c][0] if c in stats[a] and c in stats[b] else None
            paper = PAPER_TABLE4[b][c] - PAPER_TABLE4[a][c]
            agree = "" if ours is None else (" ✓" if (ours > 0) == (paper > 0) else " ✗")
            cells.append(("–" if ours is None else f"{ours:+.1f}") + f" / {paper:+.1f}{agree}")
        lines.append(f"| {VARIANTS[a].label} → {VARIANTS[b].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(stats: dict[str, dict[str, tuple[float, float]]], path: Path, seeds: int) -> Path:
    """Grouped bars (mean ± std over seeds) per metric, one bar per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c.header for c in SUMMARY_COLUMNS]
    keys = list(stats)
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(13, 4.5))
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(columns))]
        means = [stats[key].get(c, (0.0, 0.0))[0] for c in columns]
        stds = [stats[key].get(c, (0.0, 0.0))[1] for c in columns]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=LABELS[key])
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"Table 4 in miniature: tiny LLaVA captioner on the synthetic world (mean ± std, {seeds} seeds)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_ablation(cfg: AblationConfig) -> dict[str, Any]:
    base = preset(cfg.preset, out=Path(cfg.out), baseline=False, **cfg.overrides)
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    with fixed_threads(base.threads):
        for seed in cfg.seeds:
            records.extend(run_one_seed(base, seed, cfg.variants))
    config = {**asdict(cfg), "out": str(cfg.out), "demo_config": base.result_settings(), "steps": base.steps}
    return write_results(Path(cfg.out), config, records, round(time.perf_counter() - start, 1))


def write_results(out: Path, config: dict[str, Any], records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """``ablation.json``, ``ablation.md`` and ``ablation.png`` of the records (one per seed and variant)."""
    variants = tuple(k for k in LABELS if any(r["variant"] == k for r in records))
    seeds = sorted({r["seed"] for r in records})
    stats = aggregate(records, variants)
    result = {"config": {**config, "seeds": seeds}, "seconds": seconds, "records": records,
              "stats": {k: {c: list(v) for c, v in s.items()} for k, s in stats.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    md = (f"{markdown_table(stats)}\n\nChange per step (ours: mean over {len(seeds)} seeds; paper: Table 4, "
          f"LLaVA-1.5-7B; ✓ = same direction)\n\n{direction_table(stats)}\n")
    (out / "ablation.md").write_text(md)
    try:
        plot(stats, out / "ablation.png", len(seeds))
    except ImportError:
        _logger.warning("matplotlib is not installed (pip install vladva_openclip[bench]); no plot written")
    return result


def merge(parts: list[Path], out: Path) -> dict[str, Any]:
    """One result from ablation runs of disjoint seeds with the same settings (e.g. one process per seed)."""
    loaded = [json.loads((Path(p) / "ablation.json").read_text()) for p in parts]
    settings = {json.dumps(r["config"]["demo_config"], sort_keys=True) for r in loaded}
    if len(settings) != 1:
        raise ValueError(f"the ablation runs in {[str(p) for p in parts]} used different settings; merge only runs "
                         "that differ in their seeds")
    records = [rec for r in loaded for rec in r["records"]]
    seeds = [rec["seed"] for rec in records if rec["variant"] == records[0]["variant"]]
    if len(seeds) != len(set(seeds)):
        raise ValueError(f"seeds {sorted(seeds)} occur in more than one run")
    config = {**loaded[0]["config"], "out": str(out), "merged_from": [str(p) for p in parts]}
    return write_results(out, config, records, round(sum(r["seconds"] for r in loaded), 1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=AblationConfig.out)
    p.add_argument("--seeds", type=int, nargs="+", default=list(AblationConfig.seeds))
    p.add_argument("--variants", nargs="+", choices=list(LABELS), default=list(AblationConfig.variants),
                   help="rows to run (clip: the CLIP from scratch of the demo)")
    p.add_argument("--preset", default="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a demo setting, e.g. --set epochs=3")
    p.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                   help="merge the ablation.json of these runs (disjoint seeds) into --out instead of training")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.merge:
        merge(args.merge, args.out)
        print((Path(args.out) / "ablation.md").read_text())
        return
    overrides = parse_settings(args.set)
    result = run_ablation(AblationConfig(out=args.out, seeds=tuple(args.seeds), variants=tuple(args.variants),
                                         preset=args.preset, overrides=overrides))
    print((Path(args.out) / "ablation.md").read_text())
    print(f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
