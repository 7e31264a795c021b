"""Where `vladva demo`'s time goes: wall-clock per stage, and inside each trainer the data and compute time per step.

    python -m benchmarks.bench_demo                          # the default demo, as `vladva demo` runs it
    python -m benchmarks.bench_demo --preset fast --busy 1   # with one CPU-bound process running beside it
    python -m benchmarks.bench_demo --data-only              # the data path alone: PNG + CSV table vs packed table

Each run records the machine, its load average before and after (other jobs on a shared machine show there), and
writes ``bench_demo.json`` under ``--out``. ``--busy N`` starts N processes that spin on the CPU for the whole run
(the "second CPU-bound process" of a loaded machine), so that case can be measured on purpose, not by luck.
``--markdown`` prints the result as the BENCHMARKS.md section.

The per-step figures are open_clip_train's own (``Data (t)`` and ``Batch (t)`` of its log lines, averaged over the
logged intervals): data = waiting for the next batch, batch = the whole step including it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import sys
import time
from pathlib import Path

from benchmarks import _harness as H

_STEP_LINE = re.compile(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+)")
#: trainer stage -> its run directory under <out>/runs
_RUNS = {"vladva_train": "vladva-vladva", "e5v_train": "e5v", "clip_train": "clip-baseline"}


def _spin() -> None:
    x = 0
    while True:  # a CPU-bound neighbour; terminated by the parent
        x = (x * 1103515245 + 12345) % 2147483648


def step_times(log: Path) -> dict[str, float] | None:
    """Mean data and batch seconds per step from an open_clip_train ``out.log`` (None if it has no step lines)."""
    if not log.is_file():
        return None
    pairs = [(float(d), float(b)) for d, b in _STEP_LINE.findall(log.read_text())]
    if not pairs:
        return None
    data, batch = statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)
    return {"data_s_per_step": round(data, 4), "step_s": round(batch, 4), "data_share": round(data / batch, 3)}


def bench_demo(preset: str, out: Path, overrides: dict) -> dict:
    from vladva_openclip.demo.pipeline import preset as make_preset
    from vladva_openclip.demo.pipeline import run_demo

    cfg = make_preset(preset, out=out, progress=False, **overrides)
    start = time.perf_counter()
    result = run_demo(cfg, announce=lambda msg: print(msg, flush=True))
    total = time.perf_counter() - start
    stages = {k: v for k, v in result.seconds.items() if k != "total"}
    steps = {k: step_times(out / "runs" / run / "out.log") for k, run in _RUNS.items() if k in stages}
    timings = json.loads((out / "timings.json").read_text())
    cpu = timings["cpu_seconds"]
    side = sum(cpu.get(k, 0.0) for k in ("e5v_train", "e5v_eval", "clip_train", "clip_eval"))
    main = sum(cpu.values()) - side
    # On an idle machine each process has a core to itself: the wall time is the longer lane's CPU time.
    idle = max(main, side) if timings["second_process"] else main + side
    return {"preset": preset, "steps": cfg.steps, "batch_size": cfg.batch_size, "threads": cfg.threads,
            "seconds": {**stages, "total": round(total, 1)}, "cpu_seconds": cpu, "per_step": steps,
            "idle_estimate_s": round(idle, 1), "table": result.table.rows}


def bench_data(n_batches: int, batch_size: int, root: Path) -> dict:
    """Seconds per batch of the trainer's data path: the world's PNG + CSV table against a packed table (transform
    per sample, or declared and applied once when the table is opened)."""
    import open_clip
    import torch

    import vladva_openclip  # noqa: F401
    from vladva_openclip.demo.pretrain_captioner import render_split
    from vladva_openclip.synth import World, WorldConfig, build_world
    from vladva_openclip.train._common import CaptionPacker, SkipCounter
    from vladva_openclip.train.data import CaptionTableDataset
    from vladva_openclip.train.packed import PackedTableDataset, write_packed_table

    n = n_batches * batch_size
    config = WorldConfig(seed=0, short_captions="coarse", long_captions="compact")
    paths = build_world(root / "world", n_train=n, n_test=0, config=config, write_wds=False, progress=False)
    images, shorts, longs = render_split(World(config), "train", n, progress=False)
    _, _, preprocess = open_clip.create_model_and_transforms("vladva-tiny-llava")
    packer = CaptionPacker(open_clip.get_tokenizer("vladva-tiny-llava"), 32, 96)
    out = {}
    for name, make in (
        ("png_csv_table", lambda: CaptionTableDataset(paths.train_csv, preprocess, packer, SkipCounter("b"),
                                                      caption_key="short_caption")),
        ("packed_per_sample", lambda: PackedTableDataset(
            write_packed_table(root / "a.safetensors", images, shorts, longs, packer), preprocess, packer)),
        ("packed_preprocessed_once", lambda: PackedTableDataset(
            write_packed_table(root / "b.safetensors", images, shorts, longs, packer, preprocess=preprocess),
            preprocess, packer)),
    ):
        t0 = time.perf_counter()
        dataset = make()
        opened = time.perf_counter() - t0
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        per_batch = (time.perf_counter() - t0) / n_batches
        out[name] = {"open_s": round(opened, 2), "s_per_batch": round(per_batch, 4)}
    return {"batches": n_batches, "batch_size": batch_size, "data": out}


def markdown(res: dict) -> str:
    lines = ["<!-- demo:begin -->", "## `vladva demo`: where the time goes", "",
             ("Generated by `python -m benchmarks.bench_demo` (wall-clock seconds; per-step figures are open_clip_train's "
             "own Data/Batch times). The machine is shared with other jobs unless the load average says otherwise: "
             "the times are noisy."), "", f"Machine: `{res['machine']}`", ""]
    for run in res["runs"]:
        d = run["demo"]
        lines += [(f"### preset `{d['preset']}`, {d['steps']} steps x {d['batch_size']}, {d['threads']} thread(s), "
                  f"{run['busy']} busy neighbour process(es); load average before {run['load_before']}, after "
                  f"{run['load_after']}"), "",
                  "| stage | seconds | CPU seconds | data s/step | step s | data share |",
                  "|---|---:|---:|---:|---:|---:|"]
        for stage, sec in d["seconds"].items():
            st = d["per_step"].get(stage) or {}
            lines.append(f"| {stage} | {sec} | {d['cpu_seconds'].get(stage, '')} | {st.get('data_s_per_step', '')} "
                         f"| {st.get('step_s', '')} | {st.get('data_share', '')} |")
        lines += ["", (f"On an idle machine of this kind (each process on a core of its own, wall time = the longer "
                      f"lane's CPU seconds): about {d['idle_estimate_s']:.0f} s."), ""]
    if "data" in res:
        lines += [f"### The data path alone ({res['data']['batches']} batches of {res['data']['batch_size']})", "",
                  "| reader | open s | s per batch |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['open_s']} | {v['s_per_batch']} |" for k, v in res["data"]["data"].items()]
        lines.append("")
    lines.append("<!-- demo:end -->")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help="demo preset (default, fast, test)")
    p.add_argument("--busy", type=int, nargs="+", default=[0], metavar="N",
                   help="CPU-bound neighbour processes; several values run the demo once per value")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a demo setting")
    p.add_argument("--data-only", action="store_true", help="time the data path only (no training)")
    p.add_argument("--data-batches", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("bench_demo_out"))
    p.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md section")
    args = p.parse_args(argv)
    from vladva_openclip.demo.pipeline import parse_settings

    overrides = parse_settings(args.set)
    res: dict = {"machine": H.machine_name("cpu"), "runs": []}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data_only:
        res["data"] = bench_data(args.data_batches, 64, args.out / "data")
    else:
        for busy in args.busy:
            procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy)]
            for proc in procs:
                proc.start()
            try:
                before = [round(x, 2) for x in os.getloadavg()]
                demo = bench_demo(args.preset, args.out / f"busy{busy}", overrides)
                after = [round(x, 2) for x in os.getloadavg()]
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.join()
            res["runs"].append({"busy": busy, "load_before": before, "load_after": after, "demo": demo})
            print(json.dumps(res["runs"][-1]["demo"]["seconds"]), flush=True)
    (args.out / "bench_demo.json").write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res) if args.markdown else json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
