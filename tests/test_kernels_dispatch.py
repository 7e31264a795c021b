"""Dispatch rules shared by all ops, and the package working without triton installed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from vladva_openclip.kernels import OPS, KernelNotSupportedError, not_supported_reasons
from vladva_openclip.kernels._dispatch import OpRegistry, no_reasons


def test_registry_rejects_duplicates_and_reserved_names():
    reg = OpRegistry("toy")
    reg.register("reference", lambda x: x, no_reasons)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("reference", lambda x: x, no_reasons)
    with pytest.raises(KeyError, match="reserved"):
        reg.register("auto", lambda x: x, no_reasons)


def test_auto_reports_every_reason_when_nothing_fits():
    reg = OpRegistry("toy")
    reg.register("fast", lambda x: x, lambda x: ["needs a GPU"])
    reg.register("tiny", lambda x: x, lambda x: [], auto_reasons=lambda x: ["only when asked by name"])
    with pytest.raises(KernelNotSupportedError, match="fast: needs a GPU") as err:
        reg.select("auto", 1)
    assert "tiny: only when asked by name" in str(err.value)
    assert reg.select("tiny", 1).name == "tiny"  # auto-only reasons do not block an explicit request
    with pytest.raises(KernelNotSupportedError, match="impl='fast' cannot run"):
        reg.select("fast", 1)


def test_not_supported_reasons_api():
    assert set(OPS) == {"last_token_pool", "contrastive_loss", "similarity"}
    a = torch.randn(2, 3, dtype=torch.float64)
    assert any("float64" in r for r in not_supported_reasons("similarity", "triton", a, a))
    assert not_supported_reasons("similarity", "reference", a, a) == []
    with pytest.raises(ValueError, match="unknown op"):
        not_supported_reasons("matmul", "triton", a, a)


def test_package_works_without_triton():
    """Blocking `import triton` must leave every reference path working and the Triton path explaining why not."""
    code = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch
from vladva_openclip.kernels import (KernelNotSupportedError, contrastive_loss, last_token_pool, similarity,
                                     similarity_topk, triton_available)
assert not triton_available()
a, b = torch.randn(5, 8), torch.randn(5, 8)
assert contrastive_loss(a, b, 10.0).isfinite()
assert last_token_pool(torch.randn(2, 3, 8), torch.ones(2, 3)).shape == (2, 8)
assert similarity(a, b).shape == (5, 5) and similarity_topk(a, b, 2)[1].shape == (5, 2)
try:
    similarity(a, b, impl="triton")
except KernelNotSupportedError as e:
    assert "triton is not installed" in str(e)
else:
    raise AssertionError("impl='triton' should have failed")
print("OK")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]
