"""last_token_index / last_token_pool: reference semantics, and the Triton kernel (forward + backward) against it."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from _helpers_kernels import KERNEL_DEVICES, assert_close, kernel_device, nan_poison  # noqa: F401
from vladva_openclip.kernels import (
    LAST_TOKEN_POOL,
    KernelNotSupportedError,
    last_token_index,
    last_token_pool,
    last_token_pool_ref,
)


def _mask(b: int, t: int, padding: str, gen: torch.Generator) -> torch.Tensor:
    """[b, t] long mask with random lengths >= 1: left, right or mixed (holes + padding on both sides)."""
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        if padding == "right":
            mask[i, :n] = 1
        elif padding == "left":
            mask[i, t - n:] = 1
        else:
            start = int(torch.randint(0, t - n + 1, (1,), generator=gen))
            mask[i, start:start + n] = 1
            if n > 2:
                mask[i, start + 1] = 0  # a hole inside the sequence must not move the last token
    return mask


def _expected_index(mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor([max(j for j in range(mask.shape[1]) if mask[i, j] != 0) for i in range(mask.shape[0])])


@pytest.mark.parametrize("padding", ["left", "right", "mixed"])
def test_last_token_index_any_padding(padding):
    gen = torch.Generator().manual_seed(0)
    mask = _mask(9, 17, padding, gen)
    assert torch.equal(last_token_index(mask), _expected_index(mask))
    assert torch.equal(last_token_index(mask.bool()), _expected_index(mask))
    assert torch.equal(last_token_index(mask.float()), _expected_index(mask))


def test_last_token_index_examples_and_empty_rows():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [3, 1, 2, 0]
    with pytest.raises(ValueError, match=r"rows \[1\] have no nonzero entry"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        last_token_index(torch.ones(3))


def test_reference_matches_definition_and_is_batch_invariant():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 11, 24, generator=gen)
    mask = _mask(5, 11, "mixed", gen)
    idx = _expected_index(mask)
    raw = last_token_pool_ref(hidden, mask, normalize=False)
    assert torch.equal(raw, hidden[torch.arange(5), idx])
    pooled = last_token_pool_ref(hidden, mask)
    assert torch.allclose(pooled, F.normalize(hidden[torch.arange(5), idx], dim=-1), atol=1e-7)
    # one item alone gives the same embedding as inside the batch (pooling cannot depend on the other rows)
    assert torch.equal(last_token_pool_ref(hidden[2:3], mask[2:3]), pooled[2:3])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        last_token_pool(torch.randn(3, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="must be"):
        last_token_pool(torch.randn(3, 4, 5), torch.ones(3, 5))
    with pytest.raises(ValueError, match="unknown impl"):
        last_token_pool(torch.randn(3, 4, 5), torch.ones(3, 4), impl="cuda")
    with pytest.raises(KernelNotSupportedError, match="dtype torch.float64"):
        last_token_pool(torch.randn(3, 4, 5, dtype=torch.float64), torch.ones(3, 4), impl="triton")


def test_auto_uses_reference_on_cpu_even_under_the_interpreter():
    hidden, mask = torch.randn(2, 3, 4), torch.ones(2, 3)
    assert LAST_TOKEN_POOL.select("auto", hidden, mask).name == "reference"
    assert torch.equal(last_token_pool(hidden, mask), last_token_pool_ref(hidden, mask))


SHAPES = [(1, 1, 8), (3, 63, 30), (4, 257, 1000), (2, 5, 4096)]


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(kind, shape, normalize, dtype, nan_poison):  # noqa: F811
    device = kernel_device(kind)
    gen = torch.Generator().manual_seed(sum(shape))
    b, t, d = shape
    hidden = torch.randn(b, t, d, generator=gen).mul_(3).to(dtype)
    mask = _mask(b, t, ["left", "right", "mixed"][sum(shape) % 3], gen)
    grad = torch.randn(b, d, generator=gen).to(dtype)
    hidden, mask, grad = hidden.to(device), mask.to(device), grad.to(device)

    h_ref = hidden.detach().float().requires_grad_()
    expected = last_token_pool_ref(h_ref, mask, normalize)
    expected.backward(grad.float())
    h_tri = hidden.detach().clone().requires_grad_()
    actual = last_token_pool(h_tri, mask, normalize, impl="triton")
    actual.backward(grad)

    assert actual.dtype == dtype and actual.shape == (b, d)
    assert_close("pooled", actual.float(), expected, dtype)
    assert_close("d_hidden", h_tri.grad.float(), h_ref.grad, dtype)
    # only the pooled position of each row gets a gradient
    untouched = torch.ones(b, t, dtype=torch.bool, device=device)
    untouched[torch.arange(b, device=device), last_token_index(mask)] = False
    assert (h_tri.grad[untouched] == 0).all()


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
def test_triton_bool_mask_strided_hidden_and_empty_row(kind):
    device = kernel_device(kind)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 9, 2 * 40, generator=gen).to(device)
    hidden = base[:, :, ::2]  # non-contiguous last dim
    mask = _mask(4, 9, "left", gen).bool().to(device)
    assert torch.allclose(last_token_pool(hidden, mask, impl="triton"), last_token_pool_ref(hidden, mask), atol=1e-6)
    mask[2] = False
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        last_token_pool(hidden, mask, impl="triton")


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
def test_triton_zero_vector_matches_reference(kind):
    # F.normalize semantics at |x| = 0: y = x / eps, so dy/dx = g / eps (huge but finite) and y = 0
    device = kernel_device(kind)
    hidden = torch.zeros(2, 3, 16, device=device, requires_grad=True)
    mask = torch.ones(2, 3, device=device)
    out = last_token_pool(hidden, mask, impl="triton")
    out.sum().backward()
    ref_h = torch.zeros(2, 3, 16, device=device, requires_grad=True)
    last_token_pool_ref(ref_h, mask).sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.allclose(hidden.grad, ref_h.grad)


# --- what the backward keeps, host syncs, and the default path ----------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_backward_keeps_only_the_pooled_rows_not_hidden(impl):
    """The graph must not hold the [B, T, D] hidden states (2.7 GB at 64 x 4096 x 5120 bf16): once the caller drops
    them, their memory is free, and the backward still gives the right gradient."""
    from torch.multiprocessing.reductions import StorageWeakRef

    if impl == "triton":
        kernel_device("interpret")
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 50, 64, generator=gen, requires_grad=True)
    mask = _mask(3, 50, "mixed", gen)
    hidden = base * 2.0  # a non-leaf, as the LLM's last hidden states are
    watch = StorageWeakRef(hidden.untyped_storage())
    out = last_token_pool(hidden, mask, impl=impl)
    del hidden
    gc.collect()  # the interpreter's launcher leaves a reference cycle to its arguments behind
    assert watch.expired(), "the autograd graph keeps hidden alive"
    grad = torch.randn(3, 64, generator=gen)
    out.backward(grad)
    expected = torch.zeros(3, 50, 64)
    x = (2.0 * base.detach())[torch.arange(3), last_token_index(mask)].requires_grad_()
    F.normalize(x, dim=-1).backward(grad)
    expected[torch.arange(3), last_token_index(mask)] = 2.0 * x.grad
    assert torch.allclose(base.grad, expected, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_empty_rows_nan_without_check_and_raise_with_it(impl):
    if impl == "triton":
        kernel_device("interpret")
    hidden = torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
    out = last_token_pool(hidden, mask, impl=impl, check=False)  # what CUDA does by default: no host sync
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    assert torch.allclose(out[[0, 2]], F.normalize(hidden[[0, 2], [1, 3]], dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        last_token_pool(hidden, mask, impl=impl)  # CPU: checking is free, so the default checks


def test_check_default_is_free_of_host_syncs():
    from types import SimpleNamespace

    from vladva_openclip.kernels.pooling import should_check

    assert should_check(None, SimpleNamespace(is_cuda=False)) is True
    assert should_check(None, SimpleNamespace(is_cuda=True)) is False  # a CUDA check would sync every call
    assert should_check(True, SimpleNamespace(is_cuda=True)) is True
    assert should_check(False, SimpleNamespace(is_cuda=False)) is False


def test_auto_takes_the_torch_path_on_every_device():
    """kernels/README.md: the kernel saves nothing measurable, so the simpler path is the default."""
    assert LAST_TOKEN_POOL.names == ["reference", "triton"]
    hidden, mask = torch.randn(2, 3, 4), torch.ones(2, 3)
    assert LAST_TOKEN_POOL.select("auto", hidden, mask).name == "reference"
