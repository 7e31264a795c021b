"""Kernel benchmarks: fused contrastive loss vs open_clip ClipLoss vs eager torch (forward + backward, speed, peak
memory, which implementation ran, and a check of every provider's loss and gradients against the fp32 reference in
the same run) and the pooling kernel against torch's gather-and-normalize. Writes CSVs under benchmarks/results/
and regenerates the "Kernels" section of BENCHMARKS.md from every CSV present (so CPU and GPU runs from different
machines combine).

    python -m benchmarks.bench_kernels                  # this machine (CUDA if available, else CPU)
    python -m benchmarks.bench_kernels --device cuda --dtypes amp_bf16,tf32 --sizes 4096,32768 --dims 4096
    python -m benchmarks.bench_kernels --markdown-only  # rebuild the section from the CSVs
    python -m benchmarks.bench_kernels --aot            # also compile every kernel for sm_90 (no GPU needed)

``--dtypes`` takes precision modes (bench_contrastive.MODES): ``amp_bf16`` (fp32 features under bf16 autocast,
ClipLoss as open_clip_train runs it with --precision amp_bf16), ``tf32`` (fp32 with TF32 on, open_clip_train's
default for fp32), ``bf16``, ``fp16``, ``fp32`` (IEEE). Defaults: CPU fp32 on N = 1024..32768; CUDA GPU_MODES on
N = 4096, 8192, 32768, 65536 and D = 1024, 4096 (issue 13's grid). ``--no-check`` skips the reference check.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import _harness as H
from benchmarks import bench_contrastive as BC
from benchmarks import bench_pooling as BP
from vladva_openclip.progress import progress

LOSS_FIELDS = ["device", "machine", "provider", "n", "d", "dtype", "ms", "peak_tensor_mib", "peak_rss_mib", "status",
               "impl", "check", "grad_max_rel", "grad_rms_rel", "loss_rel"]
POOL_FIELDS = ["device", "machine", "impl", "b", "t", "d", "dtype", "ms", "gbps", "pct_hbm_peak", "pct_copy",
               "ms_fwd_bwd", "check", "status"]
AOT_FIELDS = ["machine", "kernel", "dtype", "config", "scenario", "registers", "spill_bytes", "shared_bytes",
              "tensor_cores", "status"]
MIB = 2 ** 20
CPU_TARGET_CASE = (8192, 1024)
CPU_SIZES, CPU_DIMS = (1024, 4096, 16384, 32768), (1536, 4096)
GPU_SIZES = (4096, 8192, 32768, 65536)
#: the modes and widths a GPU run measures by default (tests/test_kernels_aot.py checks the AOT check compiles them)
GPU_MODES = ("amp_bf16", "tf32", "bf16", "fp32")
GPU_DIMS = (1024, 4096)
DEFAULT_GRID = [(n, d) for n in GPU_SIZES for d in GPU_DIMS]
TRAINING_MODES = ("amp_bf16", "tf32")  # the targets are judged where training runs


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cpu_memory_estimate(provider: str, n: int, d: int) -> int:
    """Rough peak of a CPU run (bytes), to skip cases that cannot fit: [N, N] fp32 buffers + grads."""
    buffers = {"clip_loss": 9, "eager": 6, "fused": 0}[provider]
    return buffers * n * n * 4 + 4 * n * d * 4 + 64 * MIB


def _merge(path: Path, rows: list[dict], fields: list[str], key: tuple[str, ...]) -> None:
    """Rows replace earlier rows with the same key; other rows (other sizes, devices) are kept."""
    old = {tuple(r[k] for k in key): r for r in H.read_csv(path)}
    for r in rows:
        old[tuple(str(r[k]) for k in key)] = {k: str(r.get(k, "")) for k in fields}
    H.write_csv(path, list(old.values()), fields)


def run_contrastive(device: str, sizes: list[tuple[int, int]], dtypes: list[str], providers: list[str],
                    timeout: float, run_check: bool = True) -> list[dict]:
    machine = H.machine_name(device)
    cases = [(n, d, dt, p) for n, d in sizes for dt in dtypes for p in providers]
    rows = []
    for n, d, mode, provider in progress(cases, desc="contrastive"):
        row = {"device": device, "machine": machine, "provider": provider, "n": n, "d": d, "dtype": mode}
        if device == "cpu" and _cpu_memory_estimate(provider, n, d) > 0.7 * _ram_bytes():
            row["status"] = f"not measured: needs ~{_cpu_memory_estimate(provider, n, d) / 2**30:.0f} GiB RAM"
        else:
            if device == "cpu":
                repeats = 3 if n * n * d <= 4096 * 4096 * 1536 else 1
                res = H.run_child("bench_contrastive", ["--provider", provider, "--n", str(n), "--d", str(d),
                                                        "--dtype", mode, "--repeats", str(repeats)], timeout)
            else:
                res = BC.measure_cuda(provider, n, d, mode, run_check)
            if "error" in res:
                row["status"] = res["error"]
            else:
                row.update(ms=f"{res['ms']:.2f}", peak_tensor_mib=f"{res['peak_tensor'] / MIB:.1f}", status="ok",
                           impl=res.get("impl", ""), check=res.get("check", "not checked"))
                for key in ("grad_max_rel", "grad_rms_rel", "loss_rel"):
                    if key in res:
                        row[key] = f"{res[key]:.1e}"
                if "peak_rss" in res:
                    row["peak_rss_mib"] = f"{res['peak_rss'] / MIB:.1f}"
        tqdm.write(f"{provider:9s} N={n:6d} D={d:5d} {mode}: {row.get('ms', '-')} ms, "
                   f"{row.get('peak_tensor_mib', '-')} MiB ({row['status']}; check: {row.get('check', '-')}; "
                   f"{row.get('impl', '')})")
        rows.append(row)
    return rows


def run_pooling(device: str) -> list[dict]:
    machine = H.machine_name(device)
    rows = []
    peak = BP.hbm_peak_gbps() if device == "cuda" else None
    copy = BP.copy_gbps() if device == "cuda" else None
    shapes = BP.GPU_SHAPES if device == "cuda" else BP.CPU_SHAPES
    impls = ["triton", "reference", "auto"] if device == "cuda" else ["reference", "auto"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for (b, t, d) in shapes:
        for impl in impls:
            row = {"device": device, "machine": machine, "impl": impl, "b": b, "t": t, "d": d,
                   "dtype": str(dtype).split(".")[-1]}
            try:
                res = BP.measure((b, t, d), dtype, device, impl)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "out of memory"
                rows.append(row)
                continue
            row.update(ms=f"{res['ms']:.4f}", gbps=f"{res['gbps']:.1f}", ms_fwd_bwd=f"{res['ms_fwd_bwd']:.4f}",
                       impl=impl if res["impl"] == impl else f"{impl} -> {res['impl']}", check=res["check"],
                       status="ok")
            if peak:
                row["pct_hbm_peak"] = f"{100 * res['gbps'] / peak:.0f}"
            if copy:
                row["pct_copy"] = f"{100 * res['gbps'] / copy:.0f}"
            rows.append(row)
    return rows


def run_aot() -> list[dict]:
    """Compile every kernel launch of the benchmark's modes for sm_90 (kernels/aot.py), in a subprocess without
    TRITON_INTERPRET; one row per kernel, mode and configuration."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, "-m", "vladva_openclip.kernels.aot", "--modes", ",".join(GPU_MODES),
                        "--dim", "4096", "--json", out.name], env=env, check=False, cwd=H.REPO)
        results = json.loads(Path(out.name).read_text() or "[]")
    machine = H.machine_name("cpu")
    rows = []
    for r in results:
        status = "spills" if r["spill_bytes"] else "ok"
        rows.append({"machine": machine, "kernel": r["name"], "dtype": r["dtype"], "config": r["config"],
                     "scenario": r["scenario"], "registers": r["registers"], "spill_bytes": r["spill_bytes"], "shared_bytes": r["shared_bytes"],
                     "tensor_cores": "yes" if r["tensor_cores"] else ("-" if not r["uses_dot"] else "NO"),
                     "status": status})
    return rows


# --- the BENCHMARKS.md section ------------------------------------------------------------------------------------

def _fmt_ms(row: dict | None) -> str:
    if row is None:
        return "not run"
    return row["ms"] if row["status"] == "ok" else row["status"]


def _fmt_mem(row: dict | None) -> str:
    if row is None or row["status"] != "ok":
        return "-"
    rss = f" ({row['peak_rss_mib']})" if row.get("peak_rss_mib") else ""
    return f"{float(row['peak_tensor_mib']):.0f}{rss}"


def _ratio(a: dict | None, b: dict | None, field: str) -> float | None:
    if not a or not b or a["status"] != "ok" or b["status"] != "ok" or not a.get(field) or not b.get(field):
        return None
    return float(a[field]) / float(b[field])


def _loss_table(rows: list[dict], device: str, sizes: list[tuple[int, int]], dtypes: list[str]) -> list[str]:
    by_key = {(r["provider"], int(r["n"]), int(r["d"]), r["dtype"]): r for r in rows if r["device"] == device}
    mem_note = "peak MiB tensor (RSS)" if device == "cpu" else "peak MiB allocated"
    out = [(f"| N | D | mode | fused ms | ClipLoss ms | eager ms | fused {mem_note} | ClipLoss {mem_note} | "
           "eager peak MiB | fused / ClipLoss time | fused / ClipLoss memory | fused check (grad max rel) | "
           "ClipLoss check (grad max rel) |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, d in sizes:
        for dt in dtypes:
            f, c, e = (by_key.get((p, n, d, dt)) for p in ("fused", "clip_loss", "eager"))
            if not any((f, c, e)):
                continue
            t_ratio, m_ratio = _ratio(f, c, "ms"), _ratio(f, c, "peak_tensor_mib")
            out.append(f"| {n} | {d} | {dt} | {_fmt_ms(f)} | {_fmt_ms(c)} | {_fmt_ms(e)} | {_fmt_mem(f)} | "
                       f"{_fmt_mem(c)} | {_fmt_mem(e)} | {f'{t_ratio:.2f}' if t_ratio else '-'} | "
                       f"{f'1/{1 / m_ratio:.1f}' if m_ratio else '-'} | {_fmt_check(f)} | {_fmt_check(c)} |")
    return out


def _fmt_check(row: dict | None) -> str:
    if row is None or row.get("status") != "ok":
        return "-"
    check = row.get("check") or "not recorded"
    return f"{check} ({row['grad_max_rel']})" if row.get("grad_max_rel") else check


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**MISSED**"


def _targets(loss_rows: list[dict], pool_rows: list[dict]) -> list[str]:
    get = {(r["device"], r["provider"], int(r["n"]), int(r["d"]), r["dtype"]): r for r in loss_rows}
    lines = []
    n, d = CPU_TARGET_CASE
    f, c = get.get(("cpu", "fused", n, d, "fp32")), get.get(("cpu", "clip_loss", n, d, "fp32"))
    ratio_t, ratio_r = _ratio(f, c, "peak_tensor_mib"), _ratio(f, c, "peak_rss_mib")
    if ratio_t:
        ok = ratio_t <= 1 / 8 and (ratio_r is None or ratio_r <= 1 / 8)
        rss = f", RSS 1/{1 / ratio_r:.1f}" if ratio_r else ""
        lines.append(f"- CPU, N={n}, D={d}: fused peak memory at most 1/8 of ClipLoss's: {_verdict(ok)} "
                     f"(tensor peak 1/{1 / ratio_t:.1f}{rss}).")
    else:
        lines.append(f"- CPU, N={n}, D={d}: memory ratio not measured.")
    gpu_modes = [m for m in TRAINING_MODES if any(r["device"] == "cuda" and r["dtype"] == m for r in loss_rows)]
    if not gpu_modes:
        lines.append("- GPU, fused at least as fast as ClipLoss for N >= 4096 (modes amp_bf16 and tf32, as training "
                     "runs): **not measured** (no GPU).")
        lines.append("- GPU, fused peak memory at most 1/10 of ClipLoss's at N = 32768: **not measured** (no GPU).")
    for dt in gpu_modes:
        sizes = sorted({(k[2], k[3]) for k in get if k[0] == "cuda" and k[4] == dt})
        speed = [(n_, d_, _ratio(get.get(("cuda", "fused", n_, d_, dt)), get.get(("cuda", "clip_loss", n_, d_, dt)),
                                 "ms")) for n_, d_ in sizes if n_ >= 4096]
        speed = [(n_, d_, r) for n_, d_, r in speed if r]
        text = ", ".join(f"N={n_} D={d_}: {r:.2f}" for n_, d_, r in speed) or "not measured"
        verdict = _verdict(all(r <= 1.0 for *_, r in speed)) if speed else "**not measured**"
        lines.append(f"- GPU {dt}, fused time / ClipLoss time for N >= 4096: {text} -> {verdict}.")
        mem = [(d_, _ratio(get.get(("cuda", "fused", n_, d_, dt)), get.get(("cuda", "clip_loss", n_, d_, dt)),
                           "peak_tensor_mib")) for n_, d_ in sizes if n_ == 32768]
        mem = [(d_, r) for d_, r in mem if r]
        text = ", ".join(f"D={d_}: 1/{1 / r:.1f}" for d_, r in mem) or "not measured (ClipLoss out of memory?)"
        verdict = _verdict(all(r <= 0.1 for _, r in mem)) if mem else "**not measured**"
        lines.append(f"- GPU {dt}, fused / ClipLoss peak memory at N=32768: {text} -> {verdict}.")
    bad = [r for r in loss_rows if r["provider"] == "fused" and r.get("check") == "over tolerance"]
    if bad:
        lines.append("- Fused results over the check's tolerance: " + ", ".join(
            f"{r['device']} N={r['n']} D={r['d']} {r['dtype']} ({r['grad_max_rel']})" for r in bad) + ".")
    tri = [r for r in pool_rows if r["device"] == "cuda" and r["impl"] == "triton" and r["status"] == "ok"]
    if tri and tri[0].get("pct_hbm_peak"):
        best = max(tri, key=lambda r: float(r["gbps"]))
        ok = float(best["pct_hbm_peak"]) >= 70
        lines.append(f"- GPU pooling at >= 70% of HBM bandwidth: best {best['gbps']} GB/s = {best['pct_hbm_peak']}% "
                     f"of peak at B={best['b']}, D={best['d']} -> {_verdict(ok)}.")
    else:
        lines.append("- GPU pooling at >= 70% of HBM bandwidth: **not measured** (no GPU).")
    return lines


def render_markdown(loss_sizes: list[tuple[int, int]]) -> str:
    res = H.RESULTS
    loss_rows = H.read_csv(res / "contrastive_cpu.csv") + H.read_csv(res / "contrastive_cuda.csv")
    # the GPU table always lists the grid, plus anything measured or requested
    loss_sizes = sorted(set(loss_sizes) | set(DEFAULT_GRID) | {(int(r["n"]), int(r["d"])) for r in loss_rows})
    pool_rows = H.read_csv(res / "pooling_cpu.csv") + H.read_csv(res / "pooling_cuda.csv")
    aot_rows = H.read_csv(res / "aot_sm90.csv")
    out = ["## Kernels", "",
           ("Generated by `python -m benchmarks.bench_kernels` (raw numbers: `benchmarks/results/*.csv`). Forward + "
           "backward of the symmetric CLIP loss on unit-norm features with `logit_scale` = 100 (requires grad), "
           "returning d image, d text and d logit_scale. Providers: **fused** = `vladva_openclip.kernels."
           "contrastive_loss` (`impl=\"auto\"`: Triton on CUDA, the chunked torch reference on CPU); **ClipLoss** = "
           "`open_clip.loss.ClipLoss()`; **eager** = one `s * I @ T.T` and two `F.cross_entropy` calls."), "",
           ("How memory is measured: on CUDA, `torch.cuda.max_memory_allocated()` during one forward+backward minus "
           "what was allocated before (the inputs). On CPU each case runs in a fresh process and reports (a) the peak "
           "total size of live tensor storages, tracked over every aten op with a `TorchDispatchMode` (the CPU "
           "analogue of `max_memory_allocated`), and in brackets (b) the peak resident set size (`ru_maxrss`) above "
           "the baseline after the inputs were built, with glibc's mmap threshold pinned "
           "(`MALLOC_MMAP_THRESHOLD_=131072`) so freed blocks go back to the OS. Both exclude the inputs and include "
           "the gradients. Times: CUDA `triton.testing.do_bench` median; CPU median of 3 runs after a warm-up "
           "(1 run for the big cases)."), ""]
    machines = sorted({r["machine"] for r in loss_rows + pool_rows})
    out += ["Machines: " + "; ".join(f"`{m}`" for m in machines) if machines else "Machines: none measured yet.", ""]
    out += ["### Targets", ""] + _targets(loss_rows, pool_rows) + [""]
    cpu_sizes = sorted({(int(r["n"]), int(r["d"])) for r in loss_rows if r["device"] == "cpu"})
    if cpu_sizes:
        cpu_modes = [m for m in BC.MODES if any(r["device"] == "cpu" and r["dtype"] == m for r in loss_rows)]
        out += ["### Contrastive loss on CPU (reference path)", "",
                ("CPU timings come from 2-core machines shared with other jobs and are noisy (rows from different "
                 "sessions ran at different loads); the memory columns are not. The fused path on CPU is the "
                 "reference itself, so its check reads `is the reference`."), ""]
        out += _loss_table(loss_rows, "cpu", cpu_sizes, cpu_modes) + [""]
    gpu_modes = [m for m in BC.MODES if any(r["device"] == "cuda" and r["dtype"] == m for r in loss_rows)]
    out += ["### Contrastive loss on GPU (Triton path)", ""]
    if not gpu_modes:
        out += [("No GPU was available when these results were produced: **not measured**. "
                 "`python -m benchmarks.bench_kernels --device cuda` measures N = "
                 f"{', '.join(map(str, GPU_SIZES))}, D = {', '.join(map(str, GPU_DIMS))} in modes "
                 f"{', '.join(GPU_MODES)}."), ""]
    else:
        out += _loss_table(loss_rows, "cuda", loss_sizes, gpu_modes) + [""]
        impls = sorted({(r["n"], r["d"], r["dtype"], r["impl"]) for r in loss_rows
                        if r["device"] == "cuda" and r["provider"] == "fused" and r.get("impl")})
        if impls:
            out += ["Implementation that ran (fused), with the autotuner's picks:", ""]
            out += [f"- N={n} D={d} {m}: {impl}" for n, d, m, impl in impls] + [""]
    out += ["### Last-token pooling: Triton kernel against torch's gather-and-normalize", "",
            ("Forward bytes = pooled rows read + written + mask scanned + indices; the forward+backward time includes "
             "the dense [B, T, D] zero fill of the gradient (identical in both paths). `impl` is what ran "
             "(`auto` takes the torch path everywhere, kernels/README.md says why); `check` compares it with the "
             "torch path on the same inputs. CPU rows are torch only (CPU numbers: the Triton path would run in the "
             "interpreter)."), "",
            "| device | impl | B | T | D | dtype | fwd ms | GB/s | % HBM peak | % of measured copy | fwd+bwd ms | check |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in pool_rows:
        out.append(f"| {r['device']} | {r['impl']} | {r['b']} | {r['t']} | {r['d']} | {r['dtype']} | "
                   f"{r.get('ms') or r['status']} | {r.get('gbps') or '-'} | {r.get('pct_hbm_peak') or '-'} | "
                   f"{r.get('pct_copy') or '-'} | {r.get('ms_fwd_bwd') or '-'} | {r.get('check') or '-'} |")
    if not any(r["device"] == "cuda" for r in pool_rows):
        for b, t, d in BP.GPU_SHAPES:
            out.append(f"| cuda | triton / reference | {b} | {t} | {d} | bfloat16 | not measured | - | - | - | - | - |")
    out.append("")
    if aot_rows:
        out += ["### Ahead-of-time compile for sm_90 (no GPU needed)", "",
                ("`python -m vladva_openclip.kernels.aot` (kernels/README.md): every launch the benchmark's modes make, "
                 "bound as the JIT binds it and compiled for each autotune configuration with "
                 "`triton.compile(..., GPUTarget(\"cuda\", 90, 32))`; registers and spills from the cubin and ptxas. "
                 f"Machine: `{aot_rows[0]['machine']}`. Per kernel and mode: how many specialisations x "
                 "configurations, the register range, the largest spill, the largest shared-memory use (limit "
                 "232448 B per block) and whether the dots run on tensor cores (IEEE fp32 runs on FMA units by design: "
                 "NO is expected there)."), "",
                "| kernel | mode | compiled | registers | max spill (B) | max shared (B) | tensor cores |",
                "|---|---|---|---|---|---|---|"]
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in aot_rows:
            groups.setdefault((r["kernel"], r["dtype"]), []).append(r)
        for (kernel, mode), rs in sorted(groups.items()):
            regs = [int(r["registers"]) for r in rs]
            tc = sorted({r["tensor_cores"] for r in rs})
            out.append(f"| {kernel} | {mode} | {len(rs)} | {min(regs)}-{max(regs)} | "
                       f"{max(int(r['spill_bytes']) for r in rs)} | {max(int(r['shared_bytes']) for r in rs)} | "
                       f"{'/'.join(tc)} |")
        out.append("")
    return "\n".join(out)


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sizes", default=None, help="N values (default: CPU 1024,...,32768; CUDA 4096,...,65536)")
    parser.add_argument("--dims", default=None, help="D values (default: CPU 1536,4096; CUDA 1024,4096)")
    parser.add_argument("--extra", default=None, help="more NxD cases (default on CPU: 8192x1024, the memory target)")
    parser.add_argument("--dtypes", default=None,
                        help=f"precision modes {BC.MODES} (default: fp32 on CPU, {','.join(GPU_MODES)} on CUDA)")
    parser.add_argument("--providers", default=",".join(BC.PROVIDERS))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per CPU case")
    parser.add_argument("--no-check", action="store_true", help="skip the check against the fp32 reference (CUDA)")
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--skip-pooling", action="store_true")
    parser.add_argument("--aot", action="store_true", help="also AOT-compile every kernel for sm_90")
    parser.add_argument("--markdown", default=str(H.REPO / "BENCHMARKS.md"))
    parser.add_argument("--markdown-only", action="store_true")
    args = parser.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cpu = device == "cpu"
    n_values = args.sizes or ",".join(map(str, CPU_SIZES if cpu else GPU_SIZES))
    d_values = args.dims or ",".join(map(str, CPU_DIMS if cpu else GPU_DIMS))
    extra = args.extra if args.extra is not None else ("x".join(map(str, CPU_TARGET_CASE)) if cpu else "")
    sizes = [(n, d) for n in map(int, n_values.split(",")) for d in map(int, d_values.split(","))]
    sizes += [s for s in _parse_sizes(extra) if s not in sizes]
    sizes.sort()
    if not args.markdown_only:
        dtypes = (args.dtypes or ("fp32" if cpu else ",".join(GPU_MODES))).split(",")
        unknown = set(dtypes) - set(BC.MODES)
        if unknown:
            parser.error(f"unknown modes {sorted(unknown)}; choose from {BC.MODES}")
        if not args.skip_loss:
            rows = run_contrastive(device, sizes, dtypes, args.providers.split(","), args.timeout, not args.no_check)
            _merge(H.RESULTS / f"contrastive_{device}.csv", rows, LOSS_FIELDS, ("provider", "n", "d", "dtype"))
        if not args.skip_pooling:
            rows = run_pooling(device)
            _merge(H.RESULTS / f"pooling_{device}.csv", rows, POOL_FIELDS, ("impl", "b", "t", "d", "dtype"))
        if args.aot:
            H.write_csv(H.RESULTS / "aot_sm90.csv", run_aot(), AOT_FIELDS)  # one run is the whole picture
    H.replace_section(Path(args.markdown), "kernels", render_markdown(sizes))
    print(f"wrote {args.markdown} (section 'Kernels') and CSVs in {H.RESULTS}")


if __name__ == "__main__":
    main()
