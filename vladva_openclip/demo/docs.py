"""Regenerate the result tables of RESULTS.md and README.md from the committed result files.

    python -m vladva_openclip.demo.docs --results results/

reads ``results/ablation.json`` (the Table-4 miniature on the coarse-caption world, ``demo.ablation``), optionally
``results/ablation_detailed.json`` (the same on the detailed-caption world), ``results/generative.json``
(``demo.diagnose``) and ``results/demo_summary.json`` + ``results/demo_timings.json`` (a ``vladva demo`` run's
``summary.json`` / ``timings.json``), and rewrites the blocks between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` markers; text outside the markers is left as it is.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from .ablation import LABELS, direction_table, markdown_table
from .summary import SUMMARY_COLUMNS

#: the hypothesis' columns: the AR loss should lift them above the seeds' spread
HYPOTHESIS_COLUMNS = ("SC swap", "SC++ TOT", "Wino text", "Wino image", "Wino group")
#: the rows of the README's table (the demo's models)
README_ROWS = ("zero-shot", "vladva", "e5v", "clip")


def _stats(result: dict[str, Any]) -> dict[str, dict[str, tuple[float, float]]]:
    return {k: {c: tuple(v) for c, v in s.items()} for k, s in result["stats"].items()}


def hypothesis_table(result: dict[str, Any], without: str = "lora-soft-prompt", with_: str = "vladva") -> str:
    """+ AR loss against the same configuration without it: mean change, the seeds' spread (the larger of the two
    standard deviations), the per-seed (paired) change, and whether the change exceeds the spread."""
    stats = _stats(result)
    by_seed = {(r["variant"], r["seed"]): r["summary"] for r in result["records"]}
    seeds = sorted({r["seed"] for r in result["records"]})
    lines = [("| Column | no AR (mean ± std) | + AR (mean ± std) | change | seeds' spread | paired change per seed "
             "(mean ± std) | change > spread |"), "|---|---:|---:|---:|---:|---:|:---:|"]
    for c in HYPOTHESIS_COLUMNS:
        (ma, sa), (mb, sb) = stats[without][c], stats[with_][c]
        paired = [by_seed[(with_, s)][c] - by_seed[(without, s)][c] for s in seeds]
        sd = statistics.stdev(paired) if len(paired) > 1 else 0.0
        spread = max(sa, sb)
        lines.append(f"| {c} | {ma:.1f} ± {sa:.1f} | {mb:.1f} ± {sb:.1f} | {mb - ma:+.1f} | {spread:.1f} | "
                     f"{statistics.fmean(paired):+.1f} ± {sd:.1f} ({', '.join(f'{x:+.1f}' for x in paired)}) | "
                     f"{'yes' if mb - ma > spread else 'no'} |")
    return "\n".join(lines)


def ablation_block(result: dict[str, Any], title: str) -> str:
    stats = _stats(result)
    seeds = result["config"]["seeds"]
    demo = result["config"]["demo_config"]
    head = (f"{title}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), {result['config']['steps']} steps x "
            f"{demo['batch_size']}, {demo['n_train']} training scenes, {demo['n_test']} test scenes, short captions "
            f"`{demo['short_captions']}`, long captions `{demo['long_captions']}`; mean ± standard deviation over "
            "seeds.")
    return "\n\n".join([
        head, markdown_table(stats),
        ("Each step's change beside the paper's (ours: difference of the seed means; paper: Table 4, LLaVA-1.5-7B, "
        "SugarCrepe averages and Flickr30K R@1; ✓ = same sign)"),
        direction_table(stats),
        "The AR loss, column by column (the hypothesis: + AR beats no AR by more than the seeds' spread)",
        hypothesis_table(result)])


def readme_block(result: dict[str, Any], summary: dict[str, Any] | None, timings: dict[str, Any] | None) -> str:
    stats = _stats(result)
    columns = [c.header for c in SUMMARY_COLUMNS]
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for key in README_ROWS:
        if key in stats:
            cells = [f"{stats[key][c][0]:.1f} ± {stats[key][c][1]:.1f}" if c in stats[key] else "–" for c in columns]
            lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    n_test = result["config"]["demo_config"]["n_test"]
    lines.append("| chance | " + " | ".join(f"{c.chance(n_test):.1f}" for c in SUMMARY_COLUMNS) + " |")
    seeds = result["config"]["seeds"]
    text = [(f"Mean ± standard deviation over world/training seeds {', '.join(map(str, seeds))} "
            f"(`python -m vladva_openclip.demo.ablation`, [RESULTS.md](RESULTS.md)); `vladva demo` runs seed 0 and "
            "prints the same kind of table for it, identical on every run (fixed threads, seeds and data order).")]
    if summary is not None:
        row = next((r for r in summary["rows"] if r["model"].startswith("VladVA")), None)
        if row is not None:
            text.append("Seed 0's VladVA row: " + ", ".join(
                f"{c} {row[c]:.1f}" for c in columns if row.get(c) is not None) + ".")
    if timings is not None:
        sec = timings["seconds"]
        m = timings["machine"]
        threads = timings.get("threads", m["threads"])
        text.append(f"`vladva demo` took {sec['total']:.0f} s here, start-up and imports not counted "
                    f"({m['cores']} cores, {threads} torch thread per process"
                    + (f" and {timings['threads_after_second_process']} for the fine-tuning once the baselines' "
                       "process had ended" if timings.get("threads_after_second_process") else "")
                    + ", the baselines in a second process; load average at the end "
                    f"{m['load_average_1_5_15'][0]}), {sec['vladva_train']:.0f} s of it the VladVA fine-tuning; "
                    "BENCHMARKS.md has the breakdown, idle and beside a CPU-bound process.")
    return "\n".join(lines) + "\n\n" + " ".join(text)


def generative_block(result: dict[str, Any]) -> str:
    from .diagnose import markdown

    return (f"Seed {result['config']['world_seed']}'s models, {result['config']['n_test']} test scenes per world "
            f"(`python -m vladva_openclip.demo.diagnose`); ties count as wrong.\n\n{markdown(result)}")


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--results-md", type=Path, default=Path("RESULTS.md"))
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    args = p.parse_args(argv)

    def load(name: str) -> dict[str, Any] | None:
        path = args.results / name
        return json.loads(path.read_text()) if path.is_file() else None

    coarse = load("ablation.json")
    if coarse is None:
        raise SystemExit(f"{args.results / 'ablation.json'} is missing: run demo.ablation first")
    detailed, generative = load("ablation_detailed.json"), load("generative.json")
    summary, timings = load("demo_summary.json"), load("demo_timings.json")
    results_md = args.results_md.read_text()
    results_md = replace_block(results_md, "ablation-coarse", ablation_block(coarse, "Coarse-caption world"))
    if detailed is not None:
        results_md = replace_block(results_md, "ablation-detailed", ablation_block(detailed, "Detailed-caption world"))
    if generative is not None:
        results_md = replace_block(results_md, "generative", generative_block(generative))
    args.results_md.write_text(results_md)
    readme = replace_block(args.readme.read_text(), "demo-table", readme_block(coarse, summary, timings))
    args.readme.write_text(readme)
    print(f"rewrote the tables of {args.results_md} and {args.readme}")


if __name__ == "__main__":
    main()
