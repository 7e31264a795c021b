"""benchmarks/gpu_check.sh: the dry run end to end (every stage at toy size on CPU, Triton under the interpreter),
so the script that spends a lent GPU's minutes cannot rot between GPU sessions; plus the orchestration it relies
on: a hung stage is killed with its partial results kept, budgets, goal verdicts, the project link for machines
without an install, and the Markdown rendering."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_check", gpu_check)  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """Runs ``bash benchmarks/gpu_check.sh --dry-run`` once; (exit code, output dir, stdout)."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, GPU_CHECK_ORCHESTRATOR_PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    return proc.returncode, out, proc.stdout + proc.stderr


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_json_and_markdown(dry_run):
    rc, out, text = dry_run
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert rc == 0, text[-3000:] + log[-6000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["dry_run"] is True and results["finished"]
    assert list(results["stages"]) == list(gpu_check.STAGE_NAMES)
    for name, stage in results["stages"].items():
        assert stage["status"] == "ok", (name, stage, log[-6000:])
        assert stage["seconds"] <= stage["budget_s"] + 15

    env = results["stages"]["env"]["result"]
    import torch

    assert env["libraries"]["torch"] == torch.__version__
    assert env["device"]["device"] == "cpu" and "dry run" in env["device"]["name"]
    assert env["measured"]["matmul_fp32_tflops"] > 0

    parity = results["stages"]["parity"]["result"]
    assert parity["passed"] >= 1 and parity["failed"] == 0 and parity["pytest_exit_code"] == 0

    kern = results["stages"]["kernels"]["result"]
    assert kern["complete"]
    cases = {(r["n"], r["d"], r["dtype"]) for r in kern["loss"]}
    for n, d, dtype in cases:
        rows = {r["provider"]: r for r in kern["loss"] if (r["n"], r["d"], r["dtype"]) == (n, d, dtype)}
        assert set(rows) == {"fused", "clip_loss"}
        assert all(r["status"] == "ok" and r["ms"] > 0 and r["peak_mib"] >= 0 for r in rows.values()), rows
        assert rows["fused"]["impl"].startswith("reference")  # impl="auto" on CPU tensors: recorded, not hidden
    assert {r["dtype"] for r in kern["loss"]} == {"fp32", "bf16"}
    assert kern["pooling"] and all(r["status"] == "ok" and r["gbps"] > 0 for r in kern["pooling"])
    # the Triton kernels themselves, under the interpreter, agree with ClipLoss and the pooling reference
    assert kern["interpreter_smoke"]["loss_abs_diff"] < 1e-4
    assert kern["interpreter_smoke"]["pool_max_abs_diff"] < 1e-5

    train = results["stages"]["train"]["result"]
    models = {(r["label"], r["layers"]): r for r in train["models"]}
    assert set(models) == {("tiny-llava", 2), ("tiny-llava", 1), ("tiny-qwen2vl", 2)}
    for row in models.values():
        assert row["status"] == "ok" and row["samples_per_s"] > 0 and math.isfinite(row["loss"])
        assert row["batch"] == 2 and row["long_len"] == 12
        assert row["flops"]["hardware"] > row["flops"]["model"] > row["flops"]["vision"] > 0
        # two LLM passes per step: [image | prompt | long caption] and [short caption | prompt]
        (b1, t1), (b2, t2) = row["llm_calls"]
        assert b1 == b2 == 2 and t1 > 12 and 4 < t2 < t1
        assert 2 * 12 <= row["labelled_tokens"] <= 2 * (12 + 1)  # each long caption's tokens (+ EOS)
    # the formula and torch's own count of the same step agree to within what LoRA adds at width 64
    assert 0.7 < models[("tiny-llava", 2)]["counted_over_hardware"] < 1.6
    (extra,) = train["extrapolated"]
    assert extra["label"] == "tiny-llava" and extra["layers"] == 4 and extra["samples_per_s"] > 0
    # a linear fit over 1 and 2 layers, unless CPU timing noise made 2 layers look faster than 1
    assert "linear fit" in extra["method"] or "FLOP-proportional" in extra["method"]
    assert extra["flops"]["model"] > models[("tiny-llava", 2)]["flops"]["model"]

    infer = results["stages"]["infer"]["result"]
    labels = [r["label"] for r in infer["models"]]
    assert any(label.startswith("open_clip ViT-S-32") for label in labels)
    measured = [r for r in infer["models"] if "images_per_s" in r and not r.get("extrapolated")]
    assert len(measured) == 3 and all(r["images_per_s"] > 0 and r["texts_per_s"] > 0 for r in measured)
    assert {r.get("layers") for r in measured} == {2, 1, None}  # the CLIP reference has no LLM layers

    # a dry run never claims a GPU goal
    assert results["goals"] and all(g["status"] == "not measured" for g in results["goals"])
    markdown = (out / "gpu_check.md").read_text()
    assert markdown == gpu_check.render_markdown(results)
    assert "DRY RUN" in markdown and "#### Training step" in markdown and "| tiny-qwen2vl | 2 |" in markdown
    assert markdown.strip() in text  # also printed at the end (the device tool returns the output's tail)
    for name in gpu_check.STAGE_NAMES:
        assert f"{name}: start" in log


def test_hung_stage_is_killed_with_its_children_and_keeps_partial_results(tmp_path):
    partial, child_pid = tmp_path / "stage.json", tmp_path / "child.pid"
    code = (f"import json, subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            f"open({str(child_pid)!r}, 'w').write(str(p.pid))\n"
            f"json.dump({{'complete': False, 'rows': [1, 2]}}, open({str(partial)!r}, 'w'))\n"
            f"time.sleep(600)\n")
    log = gpu_check.Log(tmp_path / "log.txt")
    polls = []
    start = time.time()
    status, rc = gpu_check.run_stage([sys.executable, "-c", code], dict(os.environ), 3.0, log,
                                     on_poll=lambda: polls.append(1))
    assert time.time() - start < 20
    assert rc is None and status.startswith("timeout")
    assert polls  # partial results are collected while the stage runs
    assert json.loads(partial.read_text())["rows"] == [1, 2]
    pid = int(child_pid.read_text())
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the stage's child process {pid} survived the stage's kill")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that may not exist in a container counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_failed_stage_reports_exit_code(tmp_path):
    log = gpu_check.Log(tmp_path / "log.txt")
    status, rc = gpu_check.run_stage([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), 30, log)
    assert (status, rc) == ("failed: exit code 3", 3)


def test_budgets_share_the_time_left_and_keep_later_floors():
    stages = gpu_check.STAGES
    total = sum(s.weight for s in stages)
    assert gpu_check.stage_budget(0, total) == pytest.approx(stages[0].weight)
    # time left unused by earlier stages goes to the later ones in proportion
    left = 2 * sum(s.weight for s in stages[3:])
    assert gpu_check.stage_budget(3, left) == pytest.approx(2 * stages[3].weight)
    # short of time: a stage never takes what the later stages need as a minimum
    tight = sum(s.floor for s in stages[1:]) + 5
    assert gpu_check.stage_budget(1, tight) <= tight - sum(s.floor for s in stages[2:]) + 1e-9
    # a deselected later stage reserves nothing
    assert gpu_check.stage_budget(1, 100, selected=("parity",)) == pytest.approx(100)


def _loss(provider, n, d, ms, mib, dtype="bf16", status="ok"):
    return {"provider": provider, "n": n, "d": d, "dtype": dtype, "ms": ms, "peak_mib": mib, "status": status}


def test_goal_verdicts():
    loss = [_loss("fused", 4096, 1024, 1.0, 10), _loss("clip_loss", 4096, 1024, 1.5, 100),
            _loss("fused", 32768, 4096, 9.0, 50), _loss("clip_loss", 32768, 4096, 10.0, 1000),
            _loss("fused", 65536, 4096, 30.0, 90), _loss("clip_loss", 65536, 4096, None, None,
                                                         status="out of memory")]
    pool = [{"impl": "triton", "b": 65536, "t": 8, "d": 4096, "gbps": 3600.0, "pct_hbm_peak": 75.0, "status": "ok"},
            {"impl": "triton", "b": 1024, "t": 700, "d": 1536, "gbps": 900.0, "pct_hbm_peak": 18.8, "status": "ok"}]
    results = {"dry_run": False, "stages": {"kernels": {"result": {"loss": loss, "pooling": pool}}}}
    goals = {g["goal"]: g for g in gpu_check.evaluate_goals(results)}
    speed = next(g for k, g in goals.items() if k.startswith("fused loss at least as fast"))
    memory = next(g for k, g in goals.items() if k.startswith("fused loss peak memory"))
    pooling = next(g for k, g in goals.items() if k.startswith("pooling"))
    assert speed["status"] == "met" and "N=4096 D=1024: 0.67" in speed["detail"]
    assert "N=65536 D=4096: ClipLoss out of memory" in speed["detail"]
    assert memory["status"] == "met" and "D=4096: 1/20.0" in memory["detail"]
    assert pooling["status"] == "met"

    loss[0]["ms"] = 2.0  # fused slower than ClipLoss at N=4096
    loss[2]["peak_mib"] = 200  # 1/5 of ClipLoss's memory
    pool[0]["pct_hbm_peak"] = 60.0
    statuses = [g["status"] for g in gpu_check.evaluate_goals(results)]
    assert statuses == ["missed", "missed", "missed"]
    results["dry_run"] = True
    assert {g["status"] for g in gpu_check.evaluate_goals(results)} == {"not measured"}


def test_markdown_of_a_run_that_got_nowhere():
    results = {"dry_run": False, "started": "now", "budget_s": 480, "elapsed_s": 12,
               "install": {"status": "failed: no interpreter with a CUDA torch and no network to install one"},
               "stages": {"env": {"status": "not run: install failed"}}}
    results["goals"] = gpu_check.evaluate_goals(results)
    text = gpu_check.render_markdown(results)
    assert "failed: no interpreter with a CUDA torch" in text
    assert "| parity: Triton parity tests, compiled natively | not run |" in text
    assert "**not measured**" in text


def test_wheel_compatibility_filter(tmp_path):
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    names = ["pure-1.0-py3-none-any.whl", "old-1.0-cp27-cp27m-win32.whl",
             f"native-1.0-{tag}-{tag}-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"]
    wheels = [tmp_path / n for n in names]
    log = gpu_check.Log(tmp_path / "log.txt")
    kept = {w.name for w in gpu_check.compatible_wheels(sys.executable, wheels, log, dict(os.environ))}
    assert "pure-1.0-py3-none-any.whl" in kept and "old-1.0-cp27-cp27m-win32.whl" not in kept
    import platform

    if platform.machine() == "x86_64" and sys.platform == "linux":
        assert names[2] in kept


@pytest.mark.slow
def test_project_link_installs_kernels_as_a_subpackage(tmp_path):
    """Where nothing is installed (the GPU machine's image), a directory of links first on PYTHONPATH gives the
    layout of `pip install -e .`: kernels/vladva_kernels importable as vladva_openclip.kernels, even from the repo
    root."""
    gpu_check.make_shim(tmp_path)
    gpu_check.make_shim(tmp_path)  # idempotent: a second run replaces the first
    env = gpu_check.base_env(dry_run=True, site=tmp_path)
    code = ("import vladva_openclip, vladva_openclip.kernels as k, vladva_openclip.kernels.pooling as p; "
            "print(vladva_openclip.__file__); print(k.__file__); print(p.last_token_pool.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    pkg_file, kernels_file, name = out.stdout.split()
    assert pkg_file.startswith(str(tmp_path))
    assert kernels_file == str(REPO / "kernels" / "vladva_kernels" / "__init__.py")
    assert name == "last_token_pool"


def test_rerun_of_some_stages_keeps_the_others(tmp_path, capsys):
    earlier = {"dry_run": True, "started": "earlier", "stages": {
        "kernels": {"status": "ok", "result": {"loss": [], "pooling": [], "complete": True}},
        "infer": {"status": "timeout: killed after 60 s", "result": {"models": []}}}}
    (tmp_path / "gpu_check.json").write_text(json.dumps(earlier))
    # a budget too small to start the rerun stage: it is recorded as skipped, the others are carried over
    assert gpu_check.main(["--dry-run", "--stages", "env", "--budget", "3", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(results["stages"]) == ["env", "kernels", "infer"]
    assert results["stages"]["env"]["status"].startswith("skipped")
    assert results["stages"]["kernels"]["status"] == "ok (run earlier)"
    assert results["stages"]["infer"]["status"].startswith("timeout")
    assert "### GPU check (DRY RUN" in capsys.readouterr().out


@pytest.mark.skipif(gpu_check.gpu_present(), reason="this machine has an NVIDIA GPU")
def test_gpu_run_on_a_machine_without_gpu_fails_fast_and_says_why(tmp_path, monkeypatch):
    monkeypatch.delenv("GPU_CHECK_PYTHON", raising=False)
    start = time.time()
    assert gpu_check.main(["--out", str(tmp_path), "--stages", "env,kernels"]) == 0
    assert time.time() - start < 120  # no torch download, no stage started
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["install"]["status"].startswith("failed: no NVIDIA GPU")
    assert {s["status"] for s in results["stages"].values()} == {"not run: install failed"}
    assert "use --dry-run" in (tmp_path / "gpu_check.md").read_text()
