"""Shared benchmark harness: machine description, timing, peak memory, CSV and the BENCHMARKS.md section.

Timing: on CUDA ``triton.testing.do_bench`` (median over ~100 ms of repeats, L2 flushed between runs); on CPU the
median of wall-clock repeats after one warm-up run.

Peak memory:
* CUDA: ``torch.cuda.max_memory_allocated()`` during one forward+backward minus the memory allocated before it
  (inputs and their gradients' storage excluded from the baseline only if they existed before the call).
* CPU: torch has no CPU allocator statistics, so each case runs in a fresh subprocess and reports two numbers:
  - ``peak_rss``: it warms up on a tiny problem (loads BLAS/OpenMP buffers), builds the inputs, reads its resident
    set size, runs one forward+backward and reports ``ru_maxrss`` (the OS high-water mark) minus that baseline.
    The child runs with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc otherwise raises its mmap threshold after the
    first multi-MB free and serves later blocks from a heap it does not give back, so RSS would measure
    allocator history rather than live memory. This counts everything the run touches (tensors, BLAS
    workspaces), an upper bound on tensor memory.
  - ``peak_tensor``: the largest total size of live tensor storages during one forward+backward, tracked with a
    ``TorchDispatchMode`` over every aten op (storages followed by weak references): the CPU analogue of
    ``torch.cuda.max_memory_allocated``. Inputs that existed before the call are excluded from both numbers.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def machine_name(device: str) -> str:
    """One line naming the hardware and software a result was measured on."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        hw = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    else:
        cpu = platform.processor() or "CPU"
        try:
            text = Path("/proc/cpuinfo").read_text()
            cpu = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
        except (OSError, AttributeError):
            pass
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        hw = f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, no GPU"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    return f"{hw}; torch {torch.__version__}, triton {tv}"


def time_ms(fn: Callable[[], object], device: str, repeats: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up: first-touch page faults and lazy initialisation are not part of the steady state
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def tensor_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor storages created during ``fn`` and alive at the same time (CPU or any device)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Tracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in pre_existing:
                    st = t.untyped_storage()
                    self.live.setdefault(st.data_ptr(), (StorageWeakRef(st), st.nbytes()))
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                del self.live[key]
            self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
            return out

    import gc

    pre_existing = {o.untyped_storage().data_ptr() for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    with _Tracker() as tracker:
        fn()
    return tracker.peak


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_child(module: str, args: list[str], timeout: float) -> dict:
    """Run ``python -m benchmarks.<module> --child ARGS`` in a fresh process; returns its JSON (or an error)."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--child", *args]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # see the module docstring: RSS then follows live memory
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        killed = out.returncode in (-9, 137)
        return {"error": "killed (out of memory?)" if killed else f"failed: {tail[0][:200]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def replace_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` (appending it if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
