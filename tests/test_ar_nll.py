"""token_nll: the frozen-lm_head fast path (gradient formed in the forward) against plain autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vladva_openclip.ar import token_nll


def _reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def _value_and_grads(fn, hidden, weight, targets, upstream):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(weight.requires_grad)
    nll = fn(hidden, weight, targets)
    (nll * upstream).sum().backward()
    return nll.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("m,chunk", [(37, 16), (5, 1024), (64, 64), (1, 1)])
def test_frozen_head_matches_autograd(m, chunk):
    g = torch.Generator().manual_seed(m)
    hidden = torch.randn(m, 24, generator=g)
    weight = torch.randn(101, 24, generator=g) * 0.3
    targets = torch.randint(0, 101, (m,), generator=g)
    upstream = torch.rand(m, generator=g) * 2 - 0.5  # per-token weights, some negative: not a plain sum
    ref = _value_and_grads(_reference, hidden, weight, targets, upstream)
    got = _value_and_grads(lambda h, w, t: token_nll(h, w, t, chunk=chunk), hidden, weight, targets, upstream)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert got[2] is None  # frozen head: no weight gradient


def test_frozen_head_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(29, 32, generator=g)
    weight = torch.randn(77, 32, generator=g) * 0.2
    targets = torch.randint(0, 77, (29,), generator=g)
    upstream = torch.rand(29, generator=g)
    ref = _value_and_grads(_reference, hidden, weight, targets, upstream)
    got = _value_and_grads(lambda h, w, t: token_nll(h, w, t, chunk=8), hidden.bfloat16(), weight.bfloat16(),
                           targets, upstream)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=0.05, atol=0.05)
    torch.testing.assert_close(got[1].float(), ref[1], rtol=0.05, atol=0.01)


def test_trainable_head_still_gets_its_gradient():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(19, 16, generator=g)
    weight = torch.randn(50, 16, generator=g).requires_grad_(True)
    targets = torch.randint(0, 50, (19,), generator=g)
    upstream = torch.rand(19, generator=g)
    ref = _value_and_grads(_reference, hidden, weight, targets, upstream)
    got = _value_and_grads(lambda h, w, t: token_nll(h, w, t, chunk=7), hidden, weight, targets, upstream)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_grad_and_empty():
    weight = torch.randn(10, 4)
    with torch.no_grad():
        nll = token_nll(torch.randn(3, 4), weight, torch.tensor([1, 2, 3]))
    assert nll.shape == (3,) and not nll.requires_grad
    assert token_nll(torch.zeros(0, 4, requires_grad=True), weight, torch.zeros(0, dtype=torch.long)).shape == (0,)
