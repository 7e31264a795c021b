"""Precision modes: fp16/bf16 gradients and the rounding order of the backward, autocast, and TF32.

What each mode computes in is documented in kernels/README.md ("Precision modes"). The interpreter computes fp32
dots exactly whatever ``input_precision`` says, so for TF32 the tests check the decision and that it reaches every
launch; the GPU check measures its error.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers_kernels import KERNEL_DEVICES, TOL, assert_close, clip_grads_fp64, kernel_device
from vladva_openclip.kernels import contrastive_loss
from vladva_openclip.kernels.contrastive import (
    ContrastiveLossFunction,
    ReferenceBackend,
    compute_dtype,
    g_store_scale,
)


@pytest.fixture
def restore_matmul_precision():
    """Leave torch's fp32 matmul setting as it was (mixing its legacy and new APIs makes torch raise)."""
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    saved = matmul.fp32_precision if new_api else matmul.allow_tf32
    yield
    if new_api:
        matmul.fp32_precision = saved
    else:
        matmul.allow_tf32 = saved


def _features(n, d, seed, dtype=torch.float32, noise=3.0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=gen)
    txt = torch.randn(n, d, generator=gen) * noise + img
    return F.normalize(img, dim=1).to(dtype), F.normalize(txt, dim=1).to(dtype)


# --- the normalisation of the stored G -----------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 8192, 65536, 10**7])
@pytest.mark.parametrize("n_diag", [1, 2])
def test_g_store_scale_puts_the_largest_entry_just_under_2_14(n, n_diag):
    coef = 1.0 / (2 * n)
    scale = g_store_scale(coef, n_diag)
    mantissa, _ = __import__("math").frexp(scale)
    assert mantissa == 0.5, "a power of two: multiplying and dividing by it is exact"
    assert 2**13 < n_diag * coef * scale <= 2**14 < 65504 / 2


# --- the rounding order at N >= 8192 (the reference backend rounds G exactly where the Triton kernel does) ------

def _row_errors(actual, expected, floor=1e-3):
    """Largest relative error of a row whose reference norm is at least ``floor`` of the largest row norm and whose
    entries are, in RMS, normal numbers of ``actual``'s dtype: below that, the gradient's own dtype cannot hold the
    row however it is computed (the underflow GradScaler's upstream scale exists to prevent)."""
    norms = expected.double().norm(dim=1)
    normal = norms / expected.shape[1] ** 0.5 >= torch.finfo(actual.dtype).tiny
    keep = (norms >= floor * norms.max()) & normal
    if not keep.any():
        return None  # every row underflows the dtype: only the whole-tensor check applies
    err = (actual.double() - expected.double()).norm(dim=1)
    return (err[keep] / norms[keep]).max().item()


def _grads(backend, img, txt, tau, upstreams, compute):
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss = ContrastiveLossFunction.apply(backend, 2048, 0, compute, torch.tensor(tau), i, t, None, None)
    return {u: torch.autograd.grad(loss, (i, t), torch.tensor(u), retain_graph=True) for u in upstreams}


def _chunk_grads(a, b, tau, coef, upstream, g_dtype):
    """One backward chunk of the reference backend (the Triton path's numerics with ``g_dtype``): rows ``a`` against
    all columns ``b``, row softmax only (n_diag = 1), with the coefficient of an N-row batch given explicitly."""
    backend = ReferenceBackend(g_dtype=g_dtype)
    scale = torch.tensor(tau)
    row, _, _ = backend.forward_stats(a, b, scale, 0, False, None)
    da, _, _ = backend.backward_system(a, b, row, None, scale, torch.tensor(upstream), coef, 1, 0, True, False, False,
                                       None, a.dtype)
    return da


def _chunk_truth(a, b, tau, coef):
    s = tau * (a.double() @ b.double().T)
    g = torch.softmax(s, dim=1)
    g[torch.arange(a.shape[0]), torch.arange(a.shape[0])] -= 1
    return tau * coef * (g @ b.double())


@pytest.mark.parametrize("tau", [14.3, 100.0], ids=["scale-init", "scale-max"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rounding_order_unit_at_n_32768(dtype, tau, monkeypatch):
    """The backward's rounding order on one row chunk at the magnitudes of N = 32768 (coef = 1 / 2N), features with
    positives well above negatives, logit scale at open_clip's initial 1/0.07 and at its cap 100: G normalised by a
    power of two before it is rounded to 16 bits, upstream gradient and scale applied to the fp32 product. Every row
    of d features matches the float64 truth within the 16-bit tolerance, with and without GradScaler's 2^16. The
    old order (scale * G rounded, the upstream gradient after the product), run through the same code by swapping
    the normaliser for the scale, misses it by more than 100x at the initial scale, GradScaler or not."""
    from vladva_openclip.kernels import contrastive

    n_batch, rows, d = 32768, 96, 32
    coef = 1.0 / (2 * n_batch)
    gen = torch.Generator().manual_seed(0)
    b = F.normalize(torch.randn(n_batch, d, generator=gen), dim=1)
    a = F.normalize(b[:rows] + 0.25 * torch.randn(rows, d, generator=gen), dim=1)
    a, b = a.to(dtype), b.to(dtype)
    truth = _chunk_truth(a, b, tau, coef)
    errors = {}
    for upstream in (1.0, 2.0**16):
        got = _chunk_grads(a, b, tau, coef, upstream, dtype)
        assert got.dtype == dtype
        assert_close(f"d_rows x {upstream:g}", got.float(), upstream * truth, dtype)
        errors[upstream] = _row_errors(got, upstream * truth)
        assert errors[upstream] is None or errors[upstream] <= 4 * TOL[dtype]["max_rel"]
    assert errors[2.0**16] is not None  # GradScaler's scale brings the rows into range
    if dtype == torch.float16 and tau < 20:
        monkeypatch.setattr(contrastive, "g_store_scale", lambda coef, n_diag: tau)  # round(tau * G), then * grad
        old = _row_errors(_chunk_grads(a, b, tau, coef, 2.0**16, dtype), 2.0**16 * truth)
        assert old > 4 * TOL[dtype]["max_rel"] and old > 100 * errors[2.0**16], (old, errors)


@pytest.mark.slow
def test_rounding_order_end_to_end_at_8192():
    """The whole fp16 loss at N = 8192, mid-training features, through the backward the Triton path emulates: loss
    and every row of both gradients against the fp32 reference, with and without GradScaler's 2^16."""
    n, d, tau = 8192, 32, 100.0
    img, txt = _features(n, d, seed=0, dtype=torch.float16, noise=1.0)
    ref = _grads(ReferenceBackend(), img.float(), txt.float(), tau, (1.0,), torch.float32)[1.0]
    ours = _grads(ReferenceBackend(g_dtype=torch.float16), img, txt, tau, (1.0, 2.0**16), torch.float16)
    for upstream, grads in ours.items():
        for name, got, want in zip(("d_image", "d_text"), grads, ref):
            assert got.dtype == torch.float16
            assert_close(f"{name} x {upstream:g}", got.float(), upstream * want, torch.float16)
            row_error = _row_errors(got, upstream * want)
            assert row_error is not None and row_error <= 4 * TOL[torch.float16]["max_rel"], name


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
@pytest.mark.parametrize("n,d", [(63, 72), (257, 136)], ids=lambda v: str(v))
def test_triton_fp16_gradients_with_and_without_grad_scaler(kind, n, d):
    device = kernel_device(kind)
    img, txt = _features(n, d, seed=n, dtype=torch.float16)
    truth = clip_grads_fp64(img, txt, 50.0)
    i, t = img.to(device).requires_grad_(), txt.to(device).requires_grad_()
    s = torch.tensor(50.0, device=device, requires_grad=True)
    loss = contrastive_loss(i, t, s, impl="triton")
    assert abs(loss.item() - truth[0]) <= 2e-6 * truth[0]
    grads = {}
    for upstream in (1.0, 2.0**16):
        grads[upstream] = torch.autograd.grad(loss, (i, t, s), torch.tensor(upstream, device=device),
                                              retain_graph=True)
        d_img, d_txt, d_s = grads[upstream]
        assert d_img.dtype == torch.float16
        assert_close("d_image", d_img.float().cpu(), upstream * truth[1], torch.float16)
        assert_close("d_text", d_txt.float().cpu(), upstream * truth[2], torch.float16)
        assert abs(d_s.item() - upstream * truth[3]) <= 2e-5 * abs(upstream * truth[3])
    # nothing rounded to 16 bits depends on the upstream gradient: scaling it by 2^16 scales the result exactly
    # (wherever the unscaled result is a normal fp16 number; subnormals have fewer bits to begin with)
    for low, high in zip(grads[1.0][:2], grads[2.0**16][:2]):
        normal = low.abs() >= torch.finfo(torch.float16).tiny
        assert normal.float().mean() > 0.5
        assert torch.equal(low.float()[normal] * 2**16, high.float()[normal])


# --- autocast ----------------------------------------------------------------------------------------------------

def test_compute_dtype_follows_autocast():
    x = torch.zeros(2, 3)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert compute_dtype(x.half()) == torch.bfloat16
        assert compute_dtype(x.double()) == torch.float64  # autocast leaves float64 alone, and so do we
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert compute_dtype(x) == torch.float32


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_autocast_bf16_computes_the_logits_from_bf16_features(impl):
    """fp32 features under autocast(bf16): the loss is the one of the bf16-rounded features (as ClipLoss's bf16
    matmul would see them), the gradients come back fp32 and match the float64 truth on those bf16 values."""
    if impl == "triton":
        kernel_device("interpret")
    img, txt = _features(130, 72, seed=4)
    truth16 = clip_grads_fp64(img.bfloat16(), txt.bfloat16(), 40.0)
    truth32 = clip_grads_fp64(img, txt, 40.0)
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(40.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(i, t, s, impl=impl)
    d_img, d_txt, d_s = torch.autograd.grad(loss, (i, t, s))
    assert loss.dtype == torch.float32 and d_img.dtype == torch.float32 and d_txt.dtype == torch.float32
    assert abs(loss.item() - truth16[0]) <= 2e-6 * truth16[0]
    assert abs(loss.item() - truth32[0]) > 1e3 * abs(truth16[0] - loss.item())  # it did change precision
    assert_close("d_image", d_img, truth16[1], torch.bfloat16)
    assert_close("d_text", d_txt, truth16[2], torch.bfloat16)
    assert abs(d_s.item() - truth16[3]) <= 2e-5 * abs(truth16[3])


# --- TF32 ----------------------------------------------------------------------------------------------------------

@pytest.mark.triton_interpret
def test_fp32_dot_precision_follows_torch(restore_matmul_precision):
    kernel_device("interpret")
    from vladva_openclip.kernels._triton_common import dot_precision, fp32_dot_precision

    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32"
        assert fp32_dot_precision() == "tf32"
        matmul.fp32_precision = "ieee"
        assert fp32_dot_precision() == "ieee"
        matmul.fp32_precision = "none"  # back to the legacy setting
    matmul.allow_tf32 = True
    assert fp32_dot_precision() == "tf32"
    matmul.allow_tf32 = False
    assert fp32_dot_precision() == "ieee"
    torch.set_float32_matmul_precision("high")
    assert fp32_dot_precision() == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert fp32_dot_precision() == "ieee"
    assert dot_precision(torch.bfloat16) == "ieee" and dot_precision(torch.float16) == "ieee"


@pytest.mark.triton_interpret
@pytest.mark.parametrize("allow_tf32", [True, False])
def test_every_fp32_launch_gets_the_precision(allow_tf32, restore_matmul_precision):
    """Contrastive (forward, gradient tiles, both products) and similarity launches all carry it."""
    kernel_device("interpret")
    from vladva_openclip.kernels import similarity
    from vladva_openclip.kernels._triton_common import record_launches

    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    want = "tf32" if allow_tf32 else "ieee"
    img, txt = _features(70, 40, seed=5)
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    with record_launches() as launches:
        contrastive_loss(i, t, torch.tensor(10.0, requires_grad=True), impl="triton").backward()
        similarity(img, txt, impl="triton")
    names = [launch.kernel.fn.__name__ for launch in launches]
    assert {"contrastive_fwd_kernel", "contrastive_grad_kernel", "scaled_matmul_kernel",
            "similarity_fwd_kernel"} <= set(names)
    assert all(launch.kwargs["PRECISION"] == want for launch in launches)
    with record_launches() as launches:  # 16-bit operands: tensor cores, the setting does not apply
        similarity(img.bfloat16(), txt.bfloat16(), impl="triton")
    assert all(launch.kwargs["PRECISION"] == "ieee" for launch in launches)

