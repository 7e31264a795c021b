"""Ahead-of-time compile of every GPU kernel configuration for sm_90 (H100) on this CPU-only machine.

Catches what the interpreter cannot: shared-memory overflow, dot-shape and layout errors of the real GPU
configurations (the interpreter accepts any shape). Runs in a subprocess because the test session has
TRITON_INTERPRET=1, under which triton cannot compile.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from vladva_openclip.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

_CODE = """
import json, torch
from vladva_openclip.kernels.aot import compile_all
rows = [r.__dict__ for r in compile_all(torch.bfloat16, dim=4096, arch=90)]
# fp32 similarity alone takes ~3.5 s to compile; `python -m vladva_openclip.kernels.aot` covers it
rows += [r.__dict__ for r in compile_all(torch.float32, dim=4096, arch=90, only=("contrastive", "last_token"))]
print(json.dumps(rows))
"""


def test_all_kernels_compile_for_sm90_within_shared_memory():
    from vladva_openclip.kernels.aot import SM90_SHARED_LIMIT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    names = {(r["name"], r["dtype"]) for r in rows}
    for kernel in ("contrastive_fwd(col_stats=True)", "contrastive_grad", "last_token_pool_fwd", "last_token_pool_bwd"):
        assert {(kernel, "bf16"), (kernel, "fp32")} <= names
    assert ("similarity", "bf16") in names
    for r in rows:
        assert 0 <= r["shared_bytes"] <= SM90_SHARED_LIMIT, r
