"""The Triton contrastive backward: one pass over the logits per row chunk, the gradient tile written once, and memory
bounded by one G chunk plus one fp32 [N, D] accumulator (kernels/README.md, "Backward"). Parity with ClipLoss is in
tests/test_kernels_contrastive.py; this file checks the structure the GPU's speed and memory depend on."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers_kernels import kernel_device
from torch.utils._python_dispatch import TorchDispatchMode
from vladva_openclip.kernels import contrastive_loss

pytestmark = pytest.mark.triton_interpret


def _features(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=gen)
    return F.normalize(img, dim=1), F.normalize(torch.randn(n, d, generator=gen) + 0.3 * img, dim=1)


def _work_units(launch, n: int, d: int) -> float:
    """Multiply-adds of one launch in units of N^2 D (the logits of the whole batch once)."""
    name = launch.kernel.fn.__name__
    args = dict(zip(launch.kernel.arg_names, launch.args))
    if name == "scaled_matmul_kernel":
        work = args["M"] * args["N"] * args["K"]
    elif name in ("contrastive_fwd_kernel", "contrastive_grad_kernel"):
        work = args["M"] * args["N"] * args["K"]  # every program recomputes its [BM, BN] logit tile over all of D
    else:
        raise AssertionError(f"unexpected kernel {name}")
    return work / (n * n * d)


@pytest.mark.parametrize("chunk", [None, 45])
def test_global_backward_is_one_pass_of_four_units(chunk, monkeypatch):
    """Forward: one sweep. Backward, per row chunk: one gradient-tile launch that stores G once, then dA = G B and
    dB += G^T A. In all 4 units of N^2 D, where the previous two-pass backward needed 5."""
    kernel_device("interpret")
    from vladva_openclip.kernels import contrastive_triton as ct

    launches = []
    real_launch = ct.launch

    def counting(kernel, grid, *args, **kwargs):
        launches.append(type("L", (), {"kernel": kernel, "args": args, "kwargs": kwargs})())
        real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(ct, "launch", counting)
    n, d = 130, 40
    img, txt = _features(n, d)
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(20.0, requires_grad=True)
    contrastive_loss(i, t, s, impl="triton", chunk_size=chunk).backward()
    names = [launch.kernel.fn.__name__ for launch in launches]
    chunks = 1 if chunk is None else -(-n // chunk)
    assert names.count("contrastive_fwd_kernel") == 1
    assert names.count("contrastive_grad_kernel") == chunks
    grad_launches = [launch for launch in launches if launch.kernel.fn.__name__ == "contrastive_grad_kernel"]
    assert all(launch.kwargs["STORE_G"] and launch.kwargs["NEED_DSCALE"] for launch in grad_launches)
    matmuls = [launch for launch in launches if launch.kernel.fn.__name__ == "scaled_matmul_kernel"]
    assert [m.kwargs["ACCUMULATE"] for m in matmuls] == [False, True] * chunks  # dA[chunk] =, dB +=
    assert sum(_work_units(launch, n, d) for launch in launches) == pytest.approx(4.0)


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and alive at the same time (``existing``: tensors whose storage
    is not counted, such as the inputs, which the interpreter's launcher re-wraps)."""

    def __init__(self, existing=()):
        super().__init__()
        self.live: dict[int, tuple[object, int]] = {}
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef

        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.existing:
                st = t.untyped_storage()
                self.live.setdefault(st.data_ptr(), (StorageWeakRef(st), st.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_memory_is_one_chunk_plus_an_fp32_accumulator(dtype):
    kernel_device("interpret")
    n, d, chunk = 256, 48, 64
    img, txt = (x.to(dtype) for x in _features(n, d))
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(20.0, requires_grad=True)
    loss = contrastive_loss(i, t, s, impl="triton", chunk_size=chunk)
    with _LiveBytes(existing=(i, t, s)) as probe:
        torch.autograd.grad(loss, (i, t, s))
    elem = torch.empty((), dtype=dtype).element_size()
    outputs = 2 * n * d * elem  # dA and dB themselves
    bound = outputs + chunk * n * elem + n * d * 4  # + the G chunk + the fp32 dB accumulator
    assert probe.peak <= bound + 64 * 1024, f"peak {probe.peak} B > {bound} B (+ 64 KiB of statistics)"
    assert probe.peak < outputs + n * n * 4  # far from a single N x N fp32 matrix at this size already
