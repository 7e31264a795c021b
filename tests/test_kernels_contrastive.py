"""contrastive_loss / FusedClipLoss against open_clip's ClipLoss (in float64, the ground truth), on CPU (reference
path) and through the Triton kernels (interpreter on CPU, native on CUDA)."""
from __future__ import annotations

import open_clip.loss as oc_loss
import pytest
import torch
import torch.nn.functional as F
from _helpers_kernels import KERNEL_DEVICES, assert_close, kernel_device, max_rel, nan_poison  # noqa: F401
from open_clip.loss import ClipLoss
from torch.utils._python_dispatch import TorchDispatchMode
from vladva_openclip.kernels import CONTRASTIVE_LOSS, FusedClipLoss, KernelNotSupportedError, contrastive_loss

LOSS_TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6}  # the loss itself is accumulated in fp32 in both dtypes


def _features(n: int, d: int, seed: int, dtype=torch.float32, device="cpu", correlated: bool = True):
    """Unit-norm image/text pairs; ``correlated`` makes positives score higher, as in training."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=gen)
    txt = torch.randn(n, d, generator=gen) + (0.3 * img if correlated else 0.0)
    return (F.normalize(img, dim=1).to(dtype).to(device), F.normalize(txt, dim=1).to(dtype).to(device))


def _truth(img, txt, scale, **clip_kwargs):
    """ClipLoss in float64 on the same (possibly bf16-rounded) values: loss and grads of (img, txt, scale)."""
    i64 = img.detach().double().requires_grad_()
    t64 = txt.detach().double().requires_grad_()
    s64 = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    loss = ClipLoss(**clip_kwargs)(i64, t64, s64)
    return (loss, *torch.autograd.grad(loss, (i64, t64, s64)))


def _ours(img, txt, scale, **kwargs):
    i = img.detach().clone().requires_grad_()
    t = txt.detach().clone().requires_grad_()
    s = torch.tensor(float(scale), device=img.device, requires_grad=True)
    loss = contrastive_loss(i, t, s, **kwargs)
    return (loss, *torch.autograd.grad(loss, (i, t, s)))


def _check(ours, truth, dtype):
    loss, d_img, d_txt, d_scale = ours
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - truth[0].item()) <= LOSS_TOL[dtype] * max(1.0, abs(truth[0].item()))
    assert d_img.dtype == dtype and d_txt.dtype == dtype
    assert_close("d_image", d_img.float(), truth[1], dtype)
    assert_close("d_text", d_txt.float(), truth[2], dtype)
    # the scale gradient is one fp32 sum over all N^2 logits in both paths
    assert abs(d_scale.item() - truth[3].item()) <= 2e-5 * max(1e-3, abs(truth[3].item())) + 1e-7


# --- reference path (the CPU path) against ClipLoss -------------------------------------------------------------

REF_CASES = [(1, 24), (3, 40), (63, 72), (257, 136), (1000, 96)]


@pytest.mark.parametrize("n,d", REF_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_reference_matches_cliploss_fp32(n, d, scale):
    img, txt = _features(n, d, seed=n + d)
    _check(_ours(img, txt, scale, impl="reference", chunk_size=100), _truth(img, txt, scale), torch.float32)


@pytest.mark.parametrize("n,d", REF_CASES, ids=lambda v: str(v))
def test_reference_bf16_beats_cliploss_bf16(n, d):
    img, txt = _features(n, d, seed=7 * n, dtype=torch.bfloat16)
    truth = _truth(img, txt, 100.0)
    ours = _ours(img, txt, 100.0, impl="reference")
    _check(ours, truth, torch.bfloat16)
    # ClipLoss in bf16 rounds the logits themselves to bf16 (steps of 0.25-0.5 at scale 100)
    clip_bf16 = ClipLoss()(img, txt, torch.tensor(100.0))
    assert abs(ours[0].item() - truth[0].item()) <= abs(clip_bf16.item() - truth[0].item()) + 1e-6


def test_matches_cliploss_fp32_drop_in():
    img, txt = _features(129, 48, seed=3)
    s = torch.tensor(30.0, requires_grad=True)
    ref = ClipLoss()(img, txt, s)
    ours = FusedClipLoss()(img, txt, s)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert FusedClipLoss()(img, txt, s, output_dict=True).keys() == {"contrastive_loss"}


def test_logit_bias_has_no_effect_and_zero_gradient():
    img, txt = _features(33, 20, seed=5)
    s = torch.tensor(20.0)
    bias = torch.tensor(-3.5, requires_grad=True)
    ref = ClipLoss()(img.double(), txt.double(), s.double(), bias.double())
    (ref_grad,) = torch.autograd.grad(ref, bias)
    ours = contrastive_loss(img, txt, s, bias)
    (our_grad,) = torch.autograd.grad(ours, bias)
    assert abs(ours.item() - ref.item()) < 1e-5
    assert our_grad.item() == 0.0 and abs(ref_grad.item()) < 1e-9  # ClipLoss's is rounding noise around 0
    assert contrastive_loss(img, txt, s, 2.0).item() == contrastive_loss(img, txt, s).item()
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        contrastive_loss(img, txt, s, torch.zeros(2))


def test_python_float_scale_and_no_grad_inputs():
    img, txt = _features(10, 8, seed=9)
    expected = ClipLoss()(img, txt, torch.tensor(5.0))
    assert torch.allclose(contrastive_loss(img, txt, 5.0), expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(contrastive_loss(img, txt, torch.tensor(5.0)), expected, atol=1e-6)


def test_validation_errors():
    img, txt = _features(6, 8, seed=0)
    with pytest.raises(ValueError, match="same number of rows"):
        contrastive_loss(img, txt[:5], 1.0)
    with pytest.raises(ValueError, match="embedding dim"):
        contrastive_loss(img, txt[:, :4], 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        contrastive_loss(img, txt.double(), 1.0)
    with pytest.raises(ValueError, match="label_offset is only meaningful"):
        contrastive_loss(img, txt, 1.0, label_offset=2)
    with pytest.raises(ValueError, match="label_offset must be in"):
        contrastive_loss(img, txt, 1.0, label_offset=7, all_image_features=img.repeat(2, 1),
                         all_text_features=txt.repeat(2, 1))
    with pytest.raises(ValueError, match="both all_image_features and all_text_features"):
        contrastive_loss(img, txt, 1.0, all_image_features=img)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        contrastive_loss(img, txt, torch.ones(2))
    with pytest.raises(ValueError, match="empty batch"):
        contrastive_loss(img[:0], txt[:0], 1.0)
    with pytest.raises(ValueError, match="2-D"):
        contrastive_loss(img[0], txt[0], 1.0)
    with pytest.raises(KernelNotSupportedError, match="dtype torch.float64"):
        contrastive_loss(img.double(), txt.double(), 1.0, impl="triton")
    with pytest.raises(ValueError, match="unknown impl"):
        contrastive_loss(img, txt, 1.0, impl="fast")
    assert CONTRASTIVE_LOSS.select("auto", img, txt, torch.tensor(1.0), None, None).name == "reference"


class _MaxTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_reference_never_builds_the_logit_matrix():
    n, d, chunk = 512, 16, 32
    img, txt = _features(n, d, seed=1)
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    with _MaxTensor() as probe:
        contrastive_loss(img, txt, scale, impl="reference", chunk_size=chunk).backward()
    assert probe.largest <= chunk * n, f"largest intermediate {probe.largest} > chunk * N = {chunk * n}"
    with _MaxTensor() as clip_probe:
        ClipLoss()(img, txt, scale).backward()
    assert clip_probe.largest == n * n  # the baseline does build it: the probe sees what it must


@pytest.mark.parametrize("impl_kind", ["reference", pytest.param("interpret", marks=pytest.mark.triton_interpret)])
def test_saturated_logits_match_in_absolute_terms(impl_kind):
    """Positives far above negatives: the loss is ~1e-12, below fp32 resolution of lse - positive (ClipLoss in fp32
    returns ~0 too). Values must stay finite and agree with the float64 truth to absolute fp32 precision."""
    impl = "reference" if impl_kind == "reference" else "triton"
    if impl == "triton":
        kernel_device("interpret")
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(63, 72, generator=gen)
    img, txt = F.normalize(raw, dim=1), F.normalize(torch.randn(63, 72, generator=gen) + 3.0 * raw, dim=1)
    truth = _truth(img, txt, 100.0)
    ours = _ours(img, txt, 100.0, impl=impl)
    assert truth[0].item() < 1e-9
    assert abs(ours[0].item() - truth[0].item()) < 1e-6
    for got, want in zip(ours[1:], truth[1:]):
        assert torch.isfinite(got).all() and (got.double() - want).abs().max().item() < 1e-8


# --- distributed semantics, simulated by slicing ----------------------------------------------------------------

def _fake_gather(world_img, world_txt, n):
    """A stand-in for open_clip.loss.gather_features over a simulated world: same rules, no process group."""
    def gather(image_features, text_features, local_loss=False, gather_with_grad=False, rank=0, world_size=1,
               use_horovod=False):
        if gather_with_grad:
            return world_img, world_txt
        all_img = list(world_img.detach().split(n))
        all_txt = list(world_txt.detach().split(n))
        if not local_loss:
            all_img[rank], all_txt[rank] = image_features, text_features
        return torch.cat(all_img), torch.cat(all_txt)
    return gather


@pytest.mark.parametrize("local_loss,gather_with_grad", [(True, True), (True, False), (False, True), (False, False)])
def test_simulated_ranks_match_cliploss(monkeypatch, local_loss, gather_with_grad):
    world, n, d = 3, 11, 20
    img, txt = _features(world * n, d, seed=2)
    results = {}
    for name, cls, kwargs in [("clip", ClipLoss, {}), ("fused", FusedClipLoss, {"impl": "reference"})]:
        w_img, w_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
        scale = torch.tensor(25.0, requires_grad=True)
        monkeypatch.setattr(oc_loss, "gather_features", _fake_gather(w_img, w_txt, n))
        total = 0.0
        for rank in range(world):
            loss_fn = cls(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world,
                          **kwargs)
            total = total + loss_fn(w_img[rank * n:(rank + 1) * n], w_txt[rank * n:(rank + 1) * n], scale)
        results[name] = (total, *torch.autograd.grad(total, (w_img, w_txt, scale)))
    for ours, ref in zip(results["fused"], results["clip"]):
        assert max_rel(ours, ref) < 1e-5


def test_local_offsets_sum_to_the_global_loss():
    """With gather_with_grad, the mean over ranks of the local losses is the global loss (open_clip #894)."""
    world, n, d = 4, 7, 12
    img, txt = _features(world * n, d, seed=4)
    scale = torch.tensor(15.0)
    local = sum(contrastive_loss(img[r * n:(r + 1) * n], txt[r * n:(r + 1) * n], scale, label_offset=r * n,
                                 all_image_features=img, all_text_features=txt) for r in range(world)) / world
    assert torch.allclose(local, contrastive_loss(img, txt, scale), atol=1e-6)


# --- Triton kernels against the truth ----------------------------------------------------------------------------

TRITON_CASES = [(1, 24), (3, 40), (63, 72), (257, 136)]


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,d", TRITON_CASES, ids=lambda v: str(v))
def test_triton_matches_cliploss(kind, n, d, dtype, nan_poison):  # noqa: F811
    device = kernel_device(kind)
    img, txt = _features(n, d, seed=n * d, dtype=dtype, device=device)
    _check(_ours(img, txt, 50.0, impl="triton"), _truth(img.cpu(), txt.cpu(), 50.0), dtype)


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
def test_triton_chunked_backward_and_uncorrelated_features(kind, nan_poison):  # noqa: F811
    device = kernel_device(kind)
    img, txt = _features(130, 72, seed=11, device=device, correlated=False)
    # 45-row chunks do not divide 130 or the 64-row tiles: partial chunks and partial tiles both occur
    _check(_ours(img, txt, 100.0, impl="triton", chunk_size=45), _truth(img.cpu(), txt.cpu(), 100.0), torch.float32)


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
def test_triton_multiple_forward_launches_and_default_chunks(kind, monkeypatch, nan_poison):  # noqa: F811
    """Shrunk memory budgets: the forward splits its rows over several launches (merging column statistics across
    them) and the backward picks several chunks by itself."""
    from vladva_openclip.kernels import contrastive_triton

    device = kernel_device(kind)
    monkeypatch.setattr(contrastive_triton, "COL_PARTIAL_ELEMENTS", 2 * 257)  # -> 2 row blocks per launch
    monkeypatch.setattr(contrastive_triton, "CHUNK_ELEMENTS", 100 * 257)  # -> 100-row backward chunks
    img, txt = _features(257, 40, seed=13, device=device)
    _check(_ours(img, txt, 30.0, impl="triton"), _truth(img.cpu(), txt.cpu(), 30.0), torch.float32)


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_local_loss_matches_reference(kind, dtype, nan_poison):  # noqa: F811
    device = kernel_device(kind)
    world, n, d = 3, 40, 72
    img, txt = _features(world * n, d, seed=8, dtype=dtype, device=device)
    for rank in (0, 2):
        grads = {}
        for impl in ("reference", "triton"):
            w_img, w_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
            loc_img, loc_txt = w_img[rank * n:(rank + 1) * n], w_txt[rank * n:(rank + 1) * n]
            scale = torch.tensor(40.0, device=device, requires_grad=True)
            loss = contrastive_loss(loc_img, loc_txt, scale, label_offset=rank * n, all_image_features=w_img,
                                    all_text_features=w_txt, impl=impl, chunk_size=50)
            grads[impl] = (loss, *torch.autograd.grad(loss, (w_img, w_txt, scale)))
        ref, tri = grads["reference"], grads["triton"]
        assert abs(tri[0].item() - ref[0].item()) <= 2e-6 * abs(ref[0].item())
        assert_close("d_world_image", tri[1].float(), ref[1].float(), dtype)
        assert_close("d_world_text", tri[2].float(), ref[2].float(), dtype)
        assert abs(tri[3].item() - ref[3].item()) <= 2e-5 * abs(ref[3].item()) + 1e-7


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
def test_triton_fused_clip_loss_module_and_partial_grads(kind):
    device = kernel_device(kind)
    img, txt = _features(70, 40, seed=6, device=device)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    only_image = img.clone().requires_grad_()
    loss = FusedClipLoss(impl="triton")(only_image, txt, scale, output_dict=True)["contrastive_loss"]
    d_img, d_scale = torch.autograd.grad(loss, (only_image, scale))
    truth = _truth(img.cpu(), txt.cpu(), 10.0)
    assert abs(loss.item() - truth[0].item()) < 1e-5
    assert_close("d_image", d_img, truth[1], torch.float32)
    assert abs(d_scale.item() - truth[3].item()) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_large_batch_matches_reference(dtype):
    """Native kernels at a size with many row blocks, column splits and backward chunks."""
    device = kernel_device("cuda")
    img, txt = _features(3000, 1536, seed=12, dtype=dtype, device=device)
    ref = _ours(img, txt, 100.0, impl="reference")
    tri = _ours(img, txt, 100.0, impl="triton", chunk_size=1024)
    assert abs(tri[0].item() - ref[0].item()) <= 2e-6 * abs(ref[0].item())
    assert_close("d_image", tri[1].float(), ref[1].float(), dtype)
    assert_close("d_text", tri[2].float(), ref[2].float(), dtype)
    assert abs(tri[3].item() - ref[3].item()) <= 1e-4 * abs(ref[3].item()) + 1e-6
