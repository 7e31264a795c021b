"""Shared helpers for tests/test_kernels_*.py: tolerances, error metrics, kernel devices, NaN-poisoned allocation."""
from __future__ import annotations

import pytest
import torch
from vladva_openclip.kernels import triton_interpret

# Honest tolerances, against float64 ground truth on the same input values.
# fp32: everything accumulates in fp32; the largest term is the logits' own rounding: at logit_scale 100 a logit
# of ~100 carries ~1e-5 absolute error, and exp(s - lse) turns that into the same *relative* gradient error.
# bf16: outputs (and the backward's G chunk) are rounded to bf16 (8 mantissa bits, relative step 2^-8 = 3.9e-3),
# so the max error is a couple of bf16 ulps and the RMS error well under one.
# fp16: the same two roundings with 11 mantissa bits (relative step 2^-11 = 4.9e-4); G is stored normalised so that
# none of it underflows (kernels/README.md, "Precision modes"), so the bf16 reasoning carries over at 8x less.
TOL = {
    torch.float32: {"max_rel": 5e-5, "rms_rel": 2e-5},
    torch.bfloat16: {"max_rel": 2e-2, "rms_rel": 6e-3},
    torch.float16: {"max_rel": 4e-3, "rms_rel": 1e-3},
}


def max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (0 when both are 0)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    return err / scale if scale > 0 else err


def rms_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS(a - e) / RMS(e): the fla-style ratio, robust to one unlucky rounding."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = expected.pow(2).mean().sqrt().item()
    err = (actual - expected).pow(2).mean().sqrt().item()
    return err / denom if denom > 0 else err


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten NaN-poisoned output?)"
    tol = TOL[dtype]
    mr, rr = max_rel(actual, expected), rms_rel(actual, expected)
    assert mr <= tol["max_rel"] and rr <= tol["rms_rel"], (
        f"{name} ({dtype}): max_rel={mr:.2e} (tol {tol['max_rel']:.0e}), rms_rel={rr:.2e} (tol {tol['rms_rel']:.0e})")


def clip_grads_fp64(img: torch.Tensor, txt: torch.Tensor, scale: float, chunk: int = 1024
                    ) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    """ClipLoss (global, labels arange) and its gradients in float64, one [chunk, N] block at a time, so N = 8192
    and beyond fit in memory. -> (loss, d image [N, D], d text [N, D], d logit_scale), on the given values."""
    a, b = img.detach().double().cpu(), txt.detach().double().cpu()
    n = a.shape[0]
    row_lse = torch.empty(n, dtype=torch.float64)
    col_lse = torch.full((n,), float("-inf"), dtype=torch.float64)
    diag = (a * b).sum(1) * scale
    for r0 in range(0, n, chunk):
        s = scale * (a[r0:r0 + chunk] @ b.T)
        row_lse[r0:r0 + chunk] = torch.logsumexp(s, 1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(s, 0))
    loss = ((row_lse - diag).mean() + (col_lse - diag).mean()).item() / 2
    da, db = torch.zeros_like(a), torch.zeros_like(b)
    d_scale = 0.0
    for r0 in range(0, n, chunk):
        x = a[r0:r0 + chunk] @ b.T
        s = scale * x
        g = torch.exp(s - row_lse[r0:r0 + chunk, None]) + torch.exp(s - col_lse[None, :])
        rows = torch.arange(g.shape[0])
        g[rows, rows + r0] -= 2
        g /= 2 * n
        d_scale += (g * x).sum().item()
        da[r0:r0 + chunk] = scale * (g @ b)
        db += scale * (g.T @ a[r0:r0 + chunk])
    return loss, da, db, d_scale


def _interpreter_broken() -> str | None:
    """Why this triton's interpreter cannot run our kernels here, or None. triton < 3.8 turns a loop bound into an
    int with ``int(array_of_shape_1)``, which numpy >= 2.4 refuses (fixed upstream in 3.8 with ``squeeze()``)."""
    import numpy
    import triton

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())

    if version(triton.__version__) < (3, 8) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot run loops over runtime bounds with numpy "
                f"{numpy.__version__} (fixed in triton 3.8); native GPU runs are unaffected")
    return None


def _interpret_device() -> str:
    if not triton_interpret():
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported (tests/conftest.py sets it)")
    broken = _interpreter_broken()
    if broken:
        pytest.skip(broken)
    return "cpu"


def _cuda_device() -> str:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the triton_interpret variant covers the same kernels on CPU)")
    if triton_interpret():
        pytest.skip("TRITON_INTERPRET=1 is set: run with TRITON_INTERPRET=0 to test the compiled kernels")
    return "cuda"


KERNEL_DEVICES = [
    pytest.param("interpret", marks=pytest.mark.triton_interpret, id="interpret"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
]


def kernel_device(kind: str) -> str:
    """The torch device Triton kernels run on for this parametrisation (skips when unavailable)."""
    return _interpret_device() if kind == "interpret" else _cuda_device()


@pytest.fixture
def nan_poison(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled (ints: -7777) memory, so an output element the kernels
    forget to write shows up as a NaN instead of silently holding stale-but-plausible memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype != torch.bool:
            return t.fill_(-7777)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    yield
