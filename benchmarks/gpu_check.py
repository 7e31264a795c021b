"""Every missing GPU figure in one bounded run: install, then stages in order of value, each in its own process.

    bash benchmarks/gpu_check.sh                # on a machine with one NVIDIA GPU: ~8 minutes, install included
    bash benchmarks/gpu_check.sh --dry-run      # every stage at toy size on CPU (Triton under the interpreter)
    python benchmarks/gpu_check.py --render results/gpu_check.json   # Markdown again from a JSON

Stages (``benchmarks/gpu_stages/``): ``env`` (device, driver, versions, measured matmul rate and copy bandwidth),
``parity`` (the Triton parity tests compiled natively, fp32 and bf16, odd shapes), ``kernels`` (fused contrastive
loss vs open_clip's ClipLoss, pooling bandwidth), ``train`` (a training step of real-width LLaVA-1.5-7B with 4 and 2
LLM layers, extrapolated to 32; Qwen2-VL-2B), ``infer`` (encode_image / encode_text throughput, open_clip
ViT-L-14-336 as the CLIP reference).

Every stage runs as a subprocess with its own budget, out of what is left of the total: the budget of a stage is
its share (by nominal weight) of the time left, so time a stage leaves unused goes to the ones after it. A stage
past its budget is killed (its process group); what it had written stays (stages write results after every
measurement). After every stage, and every few seconds during one, ``gpu_check.json`` and ``gpu_check.md`` (a block
to paste into BENCHMARKS.md) are rewritten, and all output goes to ``gpu_check.log``, in ``$OUT`` if set, else
``benchmarks/results/gpu_check/``.

This file uses the standard library only: it runs under any python3, and installs what the stages need (see
:func:`install`) before starting them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480.0
DRY_RUN_BUDGET_S = 900.0
FINAL_RESERVE_S = 5.0  # kept back from the stages for the last write of the outputs
POLL_S = 2.0
WHEELHOUSE = REPO / "benchmarks" / "wheelhouse"
WHEELS_FILE = REPO / "benchmarks" / "gpu_wheels.txt"
# import name -> what the stages need it for (checked after the install)
REQUIRED_MODULES = ("torch", "triton", "open_clip", "transformers", "peft", "timm", "ftfy", "pytest")
# candidates for an interpreter that already has a CUDA torch (the device image's is /opt/torch/.venv)
PYTHON_CANDIDATES = ("python3", "/opt/torch/.venv/bin/python3", "python")
KERNEL_TESTS_GLOB = "tests/test_kernels_*.py"  # their `gpu` cases (dry run: `triton_interpret`) are stage parity


@dataclass(frozen=True)
class Stage:
    """One stage. ``weight``: its nominal seconds (its share of the time left); ``floor``: below this many seconds
    left it is not started."""

    name: str
    title: str
    weight: float
    floor: float


STAGES: tuple[Stage, ...] = (
    Stage("env", "Device, versions, measured ceilings", 25, 10),
    Stage("parity", "Triton parity tests, compiled natively", 110, 20),
    Stage("kernels", "Fused contrastive loss vs ClipLoss; pooling bandwidth", 110, 20),
    Stage("train", "Training step, LLaVA-1.5-7B shrunk / Qwen2-VL-2B", 140, 30),
    Stage("infer", "Inference throughput vs CLIP ViT-L-14-336", 60, 15),
    Stage("plan_memory", "vladva plan's total vs measured max_memory_allocated", 60, 20),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# --- small helpers ------------------------------------------------------------------------------------------------

def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Log:
    """Appends to gpu_check.log; ``say`` also prints a line to stdout (the device tool returns stdout's tail)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, text: str) -> None:
        with self.path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def say(self, text: str) -> None:
        line = f"[gpu_check {time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.write(line)


def stage_budget(stage_index: int, left: float, stages: tuple[Stage, ...] = STAGES,
                 selected: tuple[str, ...] = STAGE_NAMES) -> float:
    """Seconds for ``stages[stage_index]``: its weight's share of ``left`` among itself and the selected stages
    after it, but never so much that a later stage is left below its floor."""
    todo = [s for s in stages[stage_index:] if s.name in selected]
    me = stages[stage_index]
    share = left * me.weight / sum(s.weight for s in todo)
    later_floors = sum(s.floor for s in todo[1:])
    return max(min(share, left - later_floors), min(me.floor, left))


# --- install ------------------------------------------------------------------------------------------------------

# Run by a candidate interpreter; prints what it found as JSON. argv[2] is the mode: "torch" (only torch and CUDA:
# choosing an interpreter), "light" (only locates the modules: the dry run's own venv), "full" (imports them all).
PROBE = r"""
import importlib, importlib.util, json, sys
mods, mode = json.loads(sys.argv[1]), sys.argv[2]
out = {"python": sys.version.split()[0], "executable": sys.executable, "modules": {}}
def check(name):
    try:
        if mode == "light":
            return "found" if importlib.util.find_spec(name) is not None else None
        return str(getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:
        out.setdefault("errors", {})[name] = (type(err).__name__ + ": " + str(err))[:300]
        return None
for name in (["torch"] if mode == "torch" else mods):
    out["modules"][name] = check(name)
if mode != "light":
    try:
        import torch
        out["cuda"] = bool(torch.cuda.is_available())
        out["cuda_name"] = torch.cuda.get_device_name(0) if out["cuda"] else None
    except Exception:
        out["cuda"] = False
if mode == "light":  # (finding a submodule would import its parent package: open_clip, transformers...)
    out["project"] = check("vladva_openclip")
elif mode == "full":
    out["project"] = check("vladva_openclip.kernels") and importlib.import_module("vladva_openclip.kernels").__file__
for name in ("pytest_timeout", "xdist"):
    out[name] = mode != "torch" and bool(importlib.util.find_spec(name))
print(json.dumps(out))
"""


@dataclass
class Environment:
    """The interpreter the stages run with and the environment variables they get."""

    python: str
    env: dict[str, str]
    probe: dict[str, Any] = field(default_factory=dict)


def run_cmd(cmd: list[str], log: Log, timeout: float, env: dict[str, str] | None = None,
            cwd: Path = REPO) -> tuple[int, str]:
    """Run a short command (install steps, probes) with a timeout; output to the log. Returns (rc, stdout)."""
    log.write(f"$ {' '.join(cmd)}")
    try:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=max(timeout, 1.0),
                             check=False)
    except subprocess.TimeoutExpired:
        log.write(f"timed out after {timeout:.0f} s")
        return 124, ""
    except OSError as err:
        log.write(f"could not run: {err}")
        return 127, ""
    if out.stderr.strip():
        log.write(out.stderr.rstrip()[-4000:])
    return out.returncode, out.stdout


def probe(python: str, env: dict[str, str], log: Log, mode: str = "full", timeout: float = 120
          ) -> dict[str, Any] | None:
    """What ``python`` can import (see PROBE; ``mode``: torch / light / full), or None when it cannot run it."""
    rc, out = run_cmd([python, "-c", PROBE, json.dumps(REQUIRED_MODULES), mode], log, timeout, env=env, cwd=Path("/"))
    if rc != 0 or not out.strip():
        return None
    try:
        return json.loads(out.strip().splitlines()[-1])
    except ValueError:
        return None


def base_env(dry_run: bool, site: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    paths = ([str(site)] if site else []) + [str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # The repo root is on PYTHONPATH for ``benchmarks``; the working directory must not shadow the shim package
    # (python -m / -c put the cwd first unless PYTHONSAFEPATH is set; Python >= 3.11).
    env["PYTHONSAFEPATH"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run stays on the CPU even on a GPU machine
        # toy sizes gain nothing from threads, and OpenMP threads spinning on a shared, busy CPU make every small
        # op milliseconds long (10x on the 2-core CI machine)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def network_reachable(host: str = "pypi.org", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether PyPI answers (never, with ``GPU_CHECK_OFFLINE=1``: rehearsing the offline machine)."""
    if os.environ.get("GPU_CHECK_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def gpu_present() -> bool:
    """An NVIDIA GPU with its driver on this machine (before spending minutes installing a CUDA torch for it)."""
    return bool(shutil.which("nvidia-smi")) or Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia").exists()


def make_shim(site: Path) -> None:
    """``site/vladva_openclip``: the package's files linked one by one, the layout ``pip install -e .`` gives,
    without pip. ``vladva_openclip.kernels`` comes from the checkout's kernels/vladva_kernels/ (the package attaches
    it at import, see vladva_openclip/_checkout.py), as in any uninstalled copy of the repo."""
    pkg = site / "vladva_openclip"
    if pkg.is_symlink() or pkg.is_file():
        pkg.unlink()
    elif pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for entry in (REPO / "vladva_openclip").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)


def compatible_wheels(python: str, wheels: list[Path], log: Log, env: dict[str, str]) -> list[Path]:
    """The wheels ``python`` can install (pure-Python ones always; others by their tags)."""
    code = ("import json,sys\n"
            "try:\n from packaging.tags import sys_tags\nexcept ImportError:\n"
            " from pip._vendor.packaging.tags import sys_tags\n"
            "print(json.dumps(sorted({str(t) for t in sys_tags()})))")
    rc, out = run_cmd([python, "-c", code], log, 60, env=env, cwd=Path("/"))
    supported = set(json.loads(out.strip().splitlines()[-1])) if rc == 0 and out.strip() else set()
    keep = []
    for wheel in wheels:
        parts = wheel.name[:-4].split("-")
        tags = {f"{i}-{a}-{p}" for i in parts[-3].split(".") for a in parts[-2].split(".")
                for p in parts[-1].split(".")}
        if parts[-1] == "any" or tags & supported:
            keep.append(wheel)
        else:
            log.write(f"wheel {wheel.name} does not fit {python}; skipped")
    return keep


def pip_install(python: str, args: list[str], log: Log, timeout: float, env: dict[str, str]) -> bool:
    uv = shutil.which("uv")
    cmd = [uv, "pip", "install", "--python", python, *args] if uv else [python, "-m", "pip", "install", *args]
    rc, _ = run_cmd(cmd, log, timeout, env=env)
    return rc == 0


def find_torch_python(log: Log, env: dict[str, str], want_cuda: bool) -> tuple[str | None, dict | None]:
    seen = set()
    for candidate in ([os.environ["GPU_CHECK_PYTHON"]] if os.environ.get("GPU_CHECK_PYTHON") else []) + \
            list(PYTHON_CANDIDATES):
        path = shutil.which(candidate)
        # one environment per (bin directory, interpreter): a venv's python links to the base interpreter, so the
        # target alone would merge a venv (with torch) with the system python (without)
        key = (os.path.dirname(os.path.abspath(path)), os.path.realpath(path)) if path else None
        if not path or key in seen:
            continue
        seen.add(key)
        info = probe(path, env, log, mode="torch")
        if info and info["modules"].get("torch") and (info.get("cuda") or not want_cuda):
            return path, info
        log.write(f"{path}: {'no torch' if not info or not info['modules'].get('torch') else 'torch without CUDA'}")
    return None, None


def install(args: argparse.Namespace, log: Log, deadline: float) -> tuple[Environment | None, dict[str, Any]]:
    """Find or make an interpreter with a CUDA torch, then add what the stages need.

    1. An interpreter that already has torch with CUDA (``$GPU_CHECK_PYTHON``, ``python3``, the device image's
       ``/opt/torch/.venv``); in a dry run, the one running this script.
    2. None found: a venv under ``~/.cache/vladva_gpu_check`` and ``pip install torch`` plus the project from PyPI
       (needs the network; minutes).
    3. Wheels in ``benchmarks/wheelhouse/`` (``bash benchmarks/gpu_check.sh --fetch-wheels`` downloads the pinned
       pure-Python ones: open_clip, transformers, peft, timm, ...) go to a private directory put first on
       PYTHONPATH, with ``--no-index --no-deps``: offline, and nothing of the interpreter's own is changed.
    4. Still missing and the network is up: ``pip install`` of the project's dependencies into the interpreter.
    5. The project: importable already (``pip install -e .``), or a directory of links in the private directory.
    """
    record: dict[str, Any] = {"steps": []}
    start = time.time()
    site = Path(args.site) if args.site else Path(tempfile.gettempdir()) / "vladva_gpu_check_site"
    env = base_env(args.dry_run, site)

    def step(what: str, ok: bool, **extra: Any) -> None:
        record["steps"].append({"step": what, "ok": ok, "seconds": round(time.time() - start, 1), **extra})
        log.say(f"install: {what}: {'ok' if ok else 'FAILED'}")

    if args.skip_install or (args.dry_run and not args.install):
        python = args.python or sys.executable
        info = probe(python, env, log, mode="light" if args.dry_run else "full")
        step(f"use {python} as it is", info is not None)
        record.update(status="skipped (dry run)" if args.dry_run else "skipped (--skip-install)",
                      seconds=round(time.time() - start, 1), probe=info)
        return Environment(python, env, info or {}), record

    python, info = (args.python, probe(args.python, env, log, mode="torch")) if args.python else \
        find_torch_python(log, env, want_cuda=not args.dry_run)
    step("find an interpreter with a CUDA torch" + (" (dry run: any torch)" if args.dry_run else ""),
         python is not None, python=python)
    if python is None:
        if not args.dry_run and not gpu_present():
            record.update(status="failed: no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia0); "
                                 "use --dry-run to exercise the stages on CPU", seconds=round(time.time() - start, 1))
            return None, record
        if not network_reachable():
            record.update(status="failed: no interpreter with a CUDA torch and no network to install one",
                          seconds=round(time.time() - start, 1))
            return None, record
        venv = Path(os.path.expanduser("~/.cache/vladva_gpu_check/venv"))
        if not (venv / "bin" / "python").exists():
            rc, _ = run_cmd([sys.executable, "-m", "venv", str(venv)], log, 120)
            step("create a venv", rc == 0, path=str(venv))
        python = str(venv / "bin" / "python")
        ok = pip_install(python, ["torch"], log, max(deadline - time.time() - 240, 60), env)
        step("pip install torch (PyPI's CUDA build)", ok)
        info = probe(python, env, log, mode="torch")
        if not ok or not info or not info.get("cuda"):
            record.update(status="failed: could not install a CUDA torch", seconds=round(time.time() - start, 1))
            return None, record
    site.mkdir(parents=True, exist_ok=True)
    wheelhouse = Path(args.wheelhouse) if args.wheelhouse else WHEELHOUSE
    wheels = sorted(wheelhouse.glob("*.whl")) if wheelhouse.is_dir() else []
    if wheels:
        wheels = compatible_wheels(python, wheels, log, env)
        ok = pip_install(python, ["--no-index", "--no-deps", "--no-compile", "--upgrade", "--target", str(site),
                                  *map(str, wheels)], log, 180, env)
        step(f"install {len(wheels)} wheels from {wheelhouse} into {site}", ok,
             wheels=[w.name for w in wheels])
    info = probe(python, env, log, mode="light") or {}
    missing = [m for m in REQUIRED_MODULES if not (info.get("modules") or {}).get(m)]
    if missing and network_reachable():
        ok = pip_install(python, ["-e", str(REPO)], log, max(min(deadline - time.time() - 200, 300), 60), env)
        step(f"pip install -e . (missing: {', '.join(missing)})", ok)
    try:
        # Harmless where the project is installed too (the same files); needed where it is not.
        make_shim(site)
        step(f"link the project into {site}", True)
    except OSError as err:
        step("link the project", False, error=str(err))
    info = probe(python, env, log, mode="full") or {}
    missing = [m for m in REQUIRED_MODULES if not (info.get("modules") or {}).get(m)]
    if not info.get("project"):
        missing.append("vladva_openclip")
    status = "ok"
    if missing:
        status = f"incomplete: missing {', '.join(missing)}"
        if not wheels:
            status += (" (no wheels in benchmarks/wheelhouse: run `bash benchmarks/gpu_check.sh --fetch-wheels` where "
                       "PyPI is reachable and carry that folder to this machine)")
    record.update(status=status, seconds=round(time.time() - start, 1), probe=info)
    return Environment(python, env, info), record


# --- stages -------------------------------------------------------------------------------------------------------

def kill_group(proc: subprocess.Popen, log: Log) -> None:
    """End a stage: SIGTERM to its process group (it started one), SIGKILL 5 s later if still there."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    log.write(f"stage process {proc.pid} did not end after SIGKILL")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def parity_result(jsonl: Path, rc: int | None) -> dict[str, Any]:
    """Counts and the non-passing tests from the pytest record plugin's lines."""
    tests: dict[str, dict] = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            tests[rec["nodeid"]] = rec
    counts = {k: sum(1 for t in tests.values() if t["outcome"] == k) for k in ("passed", "failed", "skipped")}
    return {**counts, "pytest_exit_code": rc, "seconds_in_tests": round(sum(t["seconds"] for t in tests.values()), 1),
            "not_passed": [t for t in tests.values() if t["outcome"] != "passed"], "complete": rc is not None}


def measurement_errors(result: dict[str, Any]) -> tuple[int, int, str | None]:
    """(measurements, failed ones, first error) over a stage result's lists of rows (``guarded`` records a failed
    measurement as a row with an ``error``)."""
    total = failed = 0
    first = None
    for value in result.values():
        if isinstance(value, list):
            for row in value:
                if isinstance(row, dict):
                    total += 1
                    if "error" in row:
                        failed += 1
                        first = first or f"{row.get('name', '?')}: {row['error']}"
    return total, failed, first


def kernel_test_files() -> list[str]:
    """The kernel test files as they are now (new ones join the parity stage without a change here)."""
    return sorted(str(p.relative_to(REPO)) for p in REPO.glob(KERNEL_TESTS_GLOB))


def stage_command(stage: Stage, runtime: Environment, work: Path, soft_deadline: float, dry_run: bool,
                  context: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(runtime.env)
    if stage.name == "parity":
        env["GPU_CHECK_PYTEST_LOG"] = str(work / "parity.jsonl")
        if dry_run:
            # toy size: the first few interpreter tests of the pooling kernel's file (quick to import and run; the
            # test suite runs them all anyway)
            pooling = [f for f in kernel_test_files() if f.endswith("_pooling.py")]
            files, marker = pooling or kernel_test_files(), "triton_interpret"
            env["GPU_CHECK_PYTEST_MAX"] = "4"
        else:
            env["TRITON_INTERPRET"] = "0"  # tests/conftest.py defaults it to 1 when unset
            files, marker = kernel_test_files(), "gpu"
        cmd = [runtime.python, "-m", "pytest", "-q", "-rfE", "-p", "benchmarks.gpu_stages.pytest_record",
               "-p", "no:cacheprovider", "-m", marker, *files]
        if runtime.probe.get("pytest_timeout"):
            cmd += ["--timeout", "120" if not dry_run else "300"]
        if runtime.probe.get("xdist") and not dry_run:
            cmd += ["-n", "4"]  # compiles on 4 of the 16 cores at once
        return cmd, env
    cmd = [runtime.python, "-m", f"benchmarks.gpu_stages.{stage.name}", "--result", str(work / f"{stage.name}.json"),
           "--deadline", f"{soft_deadline:.1f}", "--context", str(context)]
    return cmd + (["--dry-run"] if dry_run else []), env


def run_stage(cmd: list[str], env: dict[str, str], budget: float, log: Log, on_poll=None) -> tuple[str, int | None]:
    """Run one stage process for at most ``budget`` seconds. Returns (status, exit code or None when killed)."""
    with log.path.open("a") as out:
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as err:
            log.write(f"could not start {cmd[0]}: {err}")
            return f"failed: could not start ({err})", None
        end = time.time() + budget
        while True:
            try:
                rc = proc.wait(timeout=min(POLL_S, max(end - time.time(), 0.1)))
                break
            except subprocess.TimeoutExpired:
                if on_poll:
                    on_poll()
                if time.time() >= end:
                    kill_group(proc, log)
                    return f"timeout: killed after {budget:.0f} s", None
    return ("ok" if rc == 0 else f"failed: exit code {rc}"), rc


# --- goals and Markdown -------------------------------------------------------------------------------------------

def _ok_rows(rows: list[dict], **match: Any) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, str]]:
    """The issue's three GPU goals: met / missed / not measured, with the figures behind each verdict."""
    kern = ((results.get("stages") or {}).get("kernels") or {}).get("result") or {}
    loss, pool = kern.get("loss") or [], kern.get("pooling") or []
    gpu = not results.get("dry_run")
    goals = []
    dtypes = sorted({r["dtype"] for r in loss if "dtype" in r}) or ["bf16"]
    for dtype in dtypes:
        ratios, notes = [], []
        for n, d in sorted({(r["n"], r["d"]) for r in loss if r.get("dtype") == dtype and r["n"] >= 4096}):
            f = _ok_rows(loss, provider="fused", n=n, d=d, dtype=dtype)
            c = [r for r in loss if r.get("provider") == "clip_loss" and (r["n"], r["d"], r["dtype"]) == (n, d, dtype)]
            if f and c and c[0].get("status") == "ok":
                ratios.append((n, d, f[0]["ms"] / c[0]["ms"]))
            elif f and c and "memory" in str(c[0].get("status")):
                notes.append(f"N={n} D={d}: ClipLoss out of memory")
        detail = ", ".join(f"N={n} D={d}: {r:.2f}" for n, d, r in ratios) or "no pair measured"
        detail += "".join(f"; {x}" for x in notes)
        status = ("met" if all(r <= 1.0 for *_, r in ratios) else "missed") if ratios and gpu else "not measured"
        goals.append({"goal": f"fused loss at least as fast as ClipLoss, N >= 4096, {dtype} (fused/ClipLoss time)",
                      "status": status, "detail": detail})
        mem = []
        for d in sorted({r["d"] for r in loss if r.get("dtype") == dtype and r["n"] == 32768}):
            f = _ok_rows(loss, provider="fused", n=32768, d=d, dtype=dtype)
            c = _ok_rows(loss, provider="clip_loss", n=32768, d=d, dtype=dtype)
            if f and c and c[0]["peak_mib"] > 0:
                mem.append((d, f[0]["peak_mib"] / c[0]["peak_mib"]))
        detail = ", ".join(f"D={d}: 1/{1 / r:.1f}" for d, r in mem) or "no pair measured at N=32768"
        status = ("met" if all(r <= 0.1 for _, r in mem) else "missed") if mem and gpu else "not measured"
        goals.append({"goal": f"fused loss peak memory at most 1/10 of ClipLoss's at N = 32768, {dtype}",
                      "status": status, "detail": detail})
    tri = [r for r in _ok_rows(pool, impl="triton") if r.get("pct_hbm_peak") is not None]
    if tri and gpu:
        best = max(tri, key=lambda r: r["pct_hbm_peak"])
        detail = "; ".join(f"B={r['b']} T={r['t']} D={r['d']}: {r['gbps']} GB/s = {r['pct_hbm_peak']}%" for r in tri)
        goals.append({"goal": "pooling kernel at >= 70% of HBM peak bandwidth (best shape)",
                      "status": "met" if best["pct_hbm_peak"] >= 70 else "missed", "detail": detail})
    else:
        goals.append({"goal": "pooling kernel at >= 70% of HBM peak bandwidth (best shape)", "status": "not measured",
                      "detail": "no Triton pooling row with a known HBM peak"})
    return goals


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _sig(value: Any, digits: int = 3) -> str:
    """A figure to ``digits`` significant digits (toy dry-run figures are tiny, GPU ones large)."""
    if value is None or value == "":
        return "-"
    return f"{float(value):.{digits}g}"


def _device_line(results: dict[str, Any]) -> str:
    env = ((results.get("stages") or {}).get("env") or {}).get("result") or {}
    dev, libs, meas = env.get("device") or {}, env.get("libraries") or {}, env.get("measured") or {}
    probe_mods = ((results.get("install") or {}).get("probe") or {}).get("modules") or {}
    versions = {k: libs.get(k) or probe_mods.get(k) for k in ("torch", "triton", "transformers", "open_clip", "peft")}
    parts = [f"**{dev.get('name') or results.get('host', {}).get('node', 'unknown device')}**"]
    if dev.get("memory_gib"):
        arch = str(dev.get("capability", "")).replace(".", "")
        parts.append(f"{dev['memory_gib']} GiB, {dev.get('sms')} SMs, sm_{arch}")
    parts.append(f"driver {dev.get('driver') or '-'}, CUDA (torch) {dev.get('torch_cuda') or '-'}")
    parts.append(", ".join(f"{k} {v or '-'}" for k, v in versions.items()) + f", python {libs.get('python', '-')}")
    line = "; ".join(parts) + "."
    sheet = dev.get("datasheet") or {}
    if meas:
        line += (f" Measured: bf16 matmul {_sig(meas.get('matmul_bf16_tflops'))} TFLOP/s, fp32 matmul "
                 f"{_sig(meas.get('matmul_fp32_tflops'))} TFLOP/s, device copy {_sig(meas.get('copy_gbps'))} GB/s")
        line += (f" (datasheet: {sheet['bf16_tflops']:.0f} TFLOP/s bf16 dense, {sheet['hbm_gbps']:.0f} GB/s HBM)."
                 if sheet else " (no datasheet entry for this device).")
    return line


def render_markdown(results: dict[str, Any]) -> str:
    """The block to paste into BENCHMARKS.md (everything measured; what was not, says so)."""
    stages = results.get("stages") or {}
    install = results.get("install") or {}
    title = "GPU check" + (" (DRY RUN on CPU: toy sizes, not GPU figures)" if results.get("dry_run") else "")
    out = [f"### {title}: {results.get('started', '')}", "",
           (f"Generated by `bash benchmarks/gpu_check.sh` in {_fmt(results.get('elapsed_s'), 0)} s of a "
            f"{_fmt(results.get('budget_s'), 0)} s budget (install: {install.get('status', '-')}, "
            f"{_fmt(install.get('seconds'), 0)} s)."), "", _device_line(results), "",
           "| stage | status | seconds | budget s |", "|---|---|---|---|"]
    for s in STAGES:
        st = stages.get(s.name) or {}
        out.append(f"| {s.name}: {s.title} | {st.get('status', 'not run')} | {_fmt(st.get('seconds'), 0)} | "
                   f"{_fmt(st.get('budget_s'), 0)} |")
    out += ["", "Goals:", ""]
    out += [f"- {g['goal']}: **{g['status']}** ({g['detail']})" for g in results.get("goals") or []]

    par = (stages.get("parity") or {}).get("result") or {}
    out += ["", "#### Triton parity tests (compiled natively)", ""]
    if par:
        out.append(f"{par.get('passed', 0)} passed, {par.get('failed', 0)} failed, {par.get('skipped', 0)} skipped "
                   f"(pytest exit code {_fmt(par.get('pytest_exit_code'))}).")
        not_passed = par.get("not_passed") or []
        for t in not_passed[:15]:
            out.append(f"- `{t['nodeid']}`: {t['outcome']} {('- ' + t['message'][:200]) if t.get('message') else ''}")
        if len(not_passed) > 15:
            out.append(f"- ... and {len(not_passed) - 15} more (gpu_check.json)")
    else:
        out.append("not run")

    kern = (stages.get("kernels") or {}).get("result") or {}
    out += ["", "#### Contrastive loss, forward + backward (fused Triton vs open_clip ClipLoss, same process)", "",
            ("| N | D | dtype | fused ms | ClipLoss ms | fused / ClipLoss time | fused peak MiB | ClipLoss peak MiB | "
             "fused / ClipLoss memory | fused impl | fused check |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    loss = kern.get("loss") or []
    for n, d, dtype in sorted({(r["n"], r["d"], r["dtype"]) for r in loss if "n" in r},
                              key=lambda k: (k[2], k[0], k[1])):
        f = next((r for r in loss if (r.get("n"), r.get("d"), r.get("dtype"), r.get("provider"))
                  == (n, d, dtype, "fused")), {})
        c = next((r for r in loss if (r.get("n"), r.get("d"), r.get("dtype"), r.get("provider"))
                  == (n, d, dtype, "clip_loss")), {})
        both = f.get("status") == "ok" and c.get("status") == "ok"
        t_ratio = f"{f['ms'] / c['ms']:.2f}" if both else "-"
        m_ratio = f"1/{c['peak_mib'] / f['peak_mib']:.1f}" if both and f["peak_mib"] > 0 else "-"
        out.append(f"| {n} | {d} | {dtype} | {f.get('ms') if f.get('status') == 'ok' else f.get('status', '-')} | "
                   f"{c.get('ms') if c.get('status') == 'ok' else c.get('status', '-')} | {t_ratio} | "
                   f"{_fmt(f.get('peak_mib'), 1)} | {_fmt(c.get('peak_mib'), 1)} | {m_ratio} | "
                   f"{f.get('impl', '-')} | {f.get('check', '-')} |")
    out += ["", "#### Last-token pooling, forward bandwidth", "",
            "| impl | B | T | D | dtype | ms | GB/s | % HBM peak | % measured copy |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in kern.get("pooling") or []:
        out.append(f"| {r.get('impl')} | {r.get('b')} | {r.get('t')} | {r.get('d')} | {r.get('dtype')} | "
                   f"{r.get('ms') if r.get('status') == 'ok' else r.get('status')} | {_fmt(r.get('gbps'), 1)} | "
                   f"{_fmt(r.get('pct_hbm_peak'), 1)} | {_fmt(r.get('pct_copy'), 1)} |")

    train = (stages.get("train") or {}).get("result") or {}
    precision = next((r["precision"] for r in train.get("models") or [] if r.get("precision")), "amp_bf16")
    dtype_text = "bf16 base under bf16 autocast" if precision == "amp_bf16" else f"{precision} (dry run)"
    out += ["", (f"#### Training step (random weights, LoRA + soft prompts, {dtype_text}, gradient checkpointing, "
                 "AdamW)"), "",
            ("| model | LLM layers | batch | short / long caption tokens | step ms | samples/s | peak GiB | "
             "model TFLOP/step | TFLOP/s | MFU (datasheet) | MFU (measured matmul) |"),
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (train.get("models") or []) + (train.get("extrapolated") or []):
        if "step_ms" not in r:
            out.append(f"| {r.get('label') or r.get('name')} | {_fmt(r.get('layers'))} | | | "
                       f"{r.get('status') or r.get('error')} | | | | | | |")
            continue
        layers = f"{r['layers']} (extrapolated: {r['method']})" if r.get("extrapolated") else str(r["layers"])
        caps = f"{r.get('short_len', '-')} / {r.get('long_len', '-')}" if not r.get("extrapolated") else "same"
        out.append(f"| {r['label']} | {layers} | {r['batch']} | {caps} | {_fmt(r['step_ms'], 1)} | "
                   f"{_sig(r['samples_per_s'])} | {_fmt(r.get('peak_gib'), 1)} | "
                   f"{_sig(r['flops']['model'] / 1e12)} | {_sig(r.get('tflops_per_s'))} | "
                   f"{_fmt(r.get('mfu'), 3)} | {_fmt(r.get('mfu_vs_measured_matmul'), 3)} |")
    if train.get("flop_formula"):
        out += ["", f"FLOP count: {train['flop_formula']}"]
    counted = [r for r in train.get("models") or [] if r.get("counted_over_hardware")]
    if counted:
        r = counted[0]
        out.append(f"Cross-check ({r['label']}, {r['layers']} layers): torch's FlopCounterMode counted "
                   f"{_sig(r['counted_flops'] / 1e12)} TFLOP in one step = {r['counted_over_hardware']:.2f} x the "
                   "formula's hardware FLOPs (recomputation included).")

    infer = (stages.get("infer") or {}).get("result") or {}
    dry = results.get("dry_run")
    out += ["", (f"#### Inference throughput ({'fp32, dry run' if dry else 'bf16'}, inference_mode, "
                 f"{'wall-clock' if dry else 'do_bench'} median)"), "",
            "| model | LLM layers | image batch | images/s | text batch | texts/s | tokens per image / text pass |",
            "|---|---|---|---|---|---|---|"]
    for r in infer.get("models") or []:
        if "images_per_s" not in r:
            out.append(f"| {r.get('label') or r.get('name')} | {_fmt(r.get('layers'))} | | "
                       f"{r.get('status') or r.get('error')} | | | |")
            continue
        layers = (f"{r['layers']} (extrapolated: {r['method']})" if r.get("extrapolated")
                  else _fmt(r.get("layers")) if r.get("layers") else "-")
        tokens = f"{_fmt(r.get('image_tokens'))} / {_fmt(r.get('text_tokens'))}"
        out.append(f"| {r['label']} | {layers} | {r.get('image_batch', '-')} | {_sig(r['images_per_s'], 4)} | "
                   f"{r.get('text_batch', '-')} | {_sig(r['texts_per_s'], 4)} | {tokens} |")
    plan = (stages.get("plan_memory") or {}).get("result") or {}
    if plan.get("cases"):
        out += ["", "#### Planned against measured memory per GPU (`vladva plan`)", "",
                ("| model | LLM layers | batch | long caption | checkpointing | planned GiB | measured GiB | "
                 "planned / measured |"), "|---|---|---|---|---|---|---|---|"]
        for r in plan["cases"]:
            if r.get("status") != "ok":
                out.append(f"| {r.get('label') or r.get('name')} | | {_fmt(r.get('batch'))} | | | "
                           f"{r.get('status') or r.get('error')} | | |")
                continue
            measured = r.get("measured_gib", r.get("measured_saved_gib"))
            ratio = r.get("planned_over_measured", r.get("planned_over_measured_saved"))
            what = "" if "measured_gib" in r else " (saved tensors, CPU)"
            planned = r["planned_gib"] if "measured_gib" in r else r["planned_saved_gib"]
            out.append(f"| {r['label']} | {r['layers']} | {r['batch']} | {r['long_len']} | "
                       f"{'on' if r['grad_checkpointing'] else 'off'} | {_fmt(planned, 3)} | "
                       f"{_fmt(measured, 3)}{what} | {_fmt(ratio, 3)} |")
    return "\n".join(out) + "\n"


# --- main ---------------------------------------------------------------------------------------------------------

def output_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return REPO / "benchmarks" / "results" / "gpu_check"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU, Triton under the interpreter")
    parser.add_argument("--out", default=None,
                        help="output directory (default: $OUT, else benchmarks/results/gpu_check)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"total seconds, install included (default {DEFAULT_BUDGET_S:.0f}; dry run "
                             f"{DRY_RUN_BUDGET_S:.0f}: a busy CPU must not turn a slow toy stage into a kill)")
    parser.add_argument("--start", type=float, default=None, help="epoch seconds the run started (gpu_check.sh)")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES), help="comma-separated subset, in any order")
    parser.add_argument("--python", default=None, help="interpreter for the stages (default: found or installed)")
    parser.add_argument("--skip-install", action="store_true", help="use --python (or this interpreter) as it is")
    parser.add_argument("--install", action="store_true",
                        help="run the install steps in a dry run too (rehearses the offline install on a CPU machine)")
    parser.add_argument("--wheelhouse", default=None, help=f"wheels to install offline (default: {WHEELHOUSE})")
    parser.add_argument("--site", default=None, help="directory for those wheels and the project link")
    parser.add_argument("--render", default=None, metavar="JSON", help="only print the Markdown of a results JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())), end="")
        return 0
    start = args.start or time.time()
    if args.budget is None:
        args.budget = DRY_RUN_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S
    deadline = start + args.budget
    selected = tuple(s for s in args.stages.split(",") if s)
    unknown = sorted(set(selected) - set(STAGE_NAMES))
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; choose from {list(STAGE_NAMES)}")
    out = output_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = read_json(out / "gpu_check.json") if set(selected) != set(STAGE_NAMES) else None
    log = Log(out / "gpu_check.log")
    if not earlier:
        log.path.write_text("")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    results: dict[str, Any] = {"schema": 1, "dry_run": args.dry_run, "started": now_iso(), "budget_s": args.budget,
                               "host": {"node": platform.node(), "cores": os.cpu_count()}, "stages": {},
                               "output_dir": str(out)}
    if earlier and bool(earlier.get("dry_run")) == args.dry_run:
        # A rerun of some stages: the other stages' results of the last run in this directory stay (and feed the
        # rerun stages' context, e.g. env's measured peaks).
        for name, entry in (earlier.get("stages") or {}).items():
            if name in STAGE_NAMES and name not in selected:
                results["stages"][name] = {**entry, "status": f"{entry.get('status')} (run {earlier.get('started')})"}

    def flush() -> None:
        results["elapsed_s"] = round(time.time() - start, 1)
        results["goals"] = evaluate_goals(results)
        write_atomic(out / "gpu_check.json", json.dumps(results, indent=1, default=str))
        write_atomic(out / "gpu_check.md", render_markdown(results))

    log.say(f"start: {'dry run' if args.dry_run else 'GPU run'}, budget {args.budget:.0f} s, output {out}")
    runtime, record = install(args, log, deadline)
    results["install"] = record
    flush()
    log.say(f"install: {record.get('status')} ({record.get('seconds')} s)")
    context = work / "context.json"
    for i, stage in enumerate(STAGES):
        if stage.name not in selected:
            continue
        left = deadline - FINAL_RESERVE_S - time.time()
        entry: dict[str, Any] = {"title": stage.title}
        results["stages"][stage.name] = entry
        results["stages"] = {s.name: results["stages"][s.name] for s in STAGES if s.name in results["stages"]}
        if runtime is None:
            entry["status"] = "not run: install failed"
            flush()
            continue
        if left < stage.floor:
            entry["status"] = f"skipped: {max(left, 0):.0f} s left, needs at least {stage.floor:.0f}"
            log.say(f"{stage.name}: {entry['status']}")
            flush()
            continue
        budget = stage_budget(i, left, selected=selected)
        # the stage aims to end a little before the hard kill, leaving time to write its results
        grace = min(15.0, 0.1 * budget)
        soft_deadline = time.time() + budget - grace
        write_atomic(context, json.dumps({k: v.get("result") for k, v in results["stages"].items()}, default=str))
        cmd, env = stage_command(stage, runtime, work, soft_deadline, args.dry_run, context)
        entry["budget_s"] = round(budget, 1)
        log.say(f"{stage.name}: start, budget {budget:.0f} s")
        log.write(f"$ {' '.join(cmd)}")
        t0 = time.time()
        result_file = work / f"{stage.name}.json"

        def collect(final: bool = False, rc: int | None = None, stage=stage, entry=entry,
                    result_file=result_file, t0=t0) -> None:
            if stage.name == "parity":
                entry["result"] = parity_result(work / "parity.jsonl", rc if final else None)
            else:
                data = read_json(result_file)
                if data is not None:
                    entry["result"] = data
            entry["seconds"] = round(time.time() - t0, 1)
            flush()

        status, rc = run_stage(cmd, env, budget, log, on_poll=collect)
        entry["status"] = status
        if stage.name == "parity" and rc not in (None, 0):
            entry["status"] = f"failed: pytest exit code {rc}" + (" (no tests ran)" if rc == 5 else "")
        collect(final=True, rc=rc)
        res = entry.get("result") or {}
        if stage.name != "parity" and status == "ok":
            total, failed, first = measurement_errors(res)
            if not res.get("complete"):
                entry["status"] = "failed: stage ended without completing its results"
            elif failed and failed == total:
                entry["status"] = f"failed: every measurement failed ({first})"[:300]
            elif failed:
                entry["status"] = f"ok, {failed} of {total} measurements failed ({first})"[:300]
        log.say(f"{stage.name}: {entry['status']} ({entry['seconds']} s)")
    results["finished"] = now_iso()
    flush()
    shutil.rmtree(work, ignore_errors=True)
    markdown = render_markdown(results)
    print("\n" + markdown, flush=True)
    # A short summary last: a tool that returns only the output's tail still gets the verdicts.
    print("\n".join(["", "Summary:", _device_line(results)]
                    + [f"- {name}: {st.get('status', 'not run')}" for name, st in results["stages"].items()]
                    + [f"- goal: {g['goal']}: {g['status']} ({g['detail']})" for g in results["goals"]]), flush=True)
    log.say(f"done in {time.time() - start:.0f} s: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
