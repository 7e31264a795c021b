"""vladva caption as users run it at scale, through the command line in subprocesses: a run killed with SIGKILL
and rerun gives the files of an uninterrupted run, and torchrun with 2 processes gives the files of 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers_caption import CAPTIONER, write_shards
from _helpers_retrieval import free_port

from vladva_openclip.caption import verify_output
from vladva_openclip.caption.output import read_sidecar

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLADVA_PROGRESS_INTERVAL": "0"}
N_SHARDS = 4


def _args(pattern: str, out: Path) -> list[str]:
    return ["caption", pattern, "-o", str(out), "--model", CAPTIONER[0], "--pretrained", CAPTIONER[1],
            "--long-prompt", "detailed", "--kind", "both", "--max-new-tokens", "16", "--short-max-new-tokens", "8",
            "--workers", "0", "--batch-size", "2", "--write-wds", "--no-progress"]


def _run(args: list[str], launcher: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m"]) + ["vladva_openclip.cli", *args]
    proc = subprocess.run(cmd, check=False, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _files(out: Path) -> dict[str, object]:
    """What the job wrote, comparable across runs: sidecar tables and records, rewritten tars' bytes."""
    files: dict[str, object] = {}
    for p in sorted((out / "sidecars").glob("*.parquet")):
        df, meta = read_sidecar(p)
        files[p.name] = (df.to_json(), meta)
    for p in sorted((out / "wds").glob("*")):
        files[p.name] = p.read_bytes()
    return files


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_dist")
    return write_shards(root / "shards", N_SHARDS, 3, corrupt=((2, 1),))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("caption_ref") / "out"
    _run(_args(shards, out))
    files = _files(out)
    assert len([k for k in files if k.endswith(".parquet")]) == N_SHARDS
    return files, out


@pytest.mark.slow
def test_sigkill_then_rerun_equals_an_uninterrupted_run(shards, reference, tmp_path):
    reference, _ = reference
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vladva_openclip.cli", *_args(shards, out)], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not list((out / "sidecars").glob("*.parquet")):
            assert proc.poll() is None, "the run ended before its first shard was seen"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    done = list((out / "sidecars").glob("*.parquet"))
    assert 1 <= len(done) < N_SHARDS, "the kill did not land mid-run"
    assert not (out / "manifest.json").exists()
    rerun = _run(_args(shards, out))
    assert "this run: " in rerun.stdout
    assert _files(out) == reference
    assert not list(out.rglob(".*.tmp"))
    report = verify_output(out)
    assert report["ok"] and report["captioned"] == 3 * N_SHARDS - 1 and report["skipped"] == 1


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_equal_one_and_resume_a_one_process_run(shards, reference, tmp_path):
    """2 ranks from scratch write the files of 1 process; and 2 ranks finish what a 1-process run left (its job
    file and first shard copied in), again with the same files."""
    import shutil

    reference, ref_out = reference
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m"]
    out = tmp_path / "out"
    _run(_args(shards, out), launcher=launcher)
    assert _files(out) == reference
    assert '"world_size": 2' in (out / "manifest.json").read_text()
    assert verify_output(out)["ok"]

    partial = tmp_path / "partial"
    (partial / "sidecars").mkdir(parents=True)
    (partial / "wds").mkdir()
    shutil.copy(ref_out / "caption_job.json", partial / "caption_job.json")
    shutil.copy(ref_out / "sidecars" / "00000.captions.parquet", partial / "sidecars")
    shutil.copy(ref_out / "wds" / "00000.tar", partial / "wds")
    launcher[launcher.index("--master_port") + 1] = str(free_port())
    _run(_args(shards, partial), launcher=launcher)
    assert _files(partial) == reference
    manifest = json.loads((partial / "manifest.json").read_text())
    assert manifest["this_run"]["images"] == 3 * (N_SHARDS - 1)  # shard 0 was not redone
