"""similarity / similarity_topk: reference semantics, deterministic tie-breaking, and the Triton kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers_kernels import KERNEL_DEVICES, assert_close, kernel_device, nan_poison  # noqa: F401
from vladva_openclip.kernels import SIMILARITY, KernelNotSupportedError, similarity, similarity_topk


def _pair(q: int, g: int, d: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=gen).to(dtype), torch.randn(g, d, generator=gen).mul(3).to(dtype)


def _brute_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Definition of the tie rule: sort by (score desc, index asc) in Python, one row at a time."""
    vals, idx = [], []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        idx.append(order)
        vals.append([row[j] for j in order])
    return torch.tensor(vals), torch.tensor(idx)


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_is_scaled_cosine(normalize):
    a, b = _pair(7, 33, 19, seed=0, dtype=torch.bfloat16)
    out = similarity(a, b, scale=2.5, normalize=normalize)
    a32, b32 = a.double(), b.double()
    if normalize:
        a32, b32 = F.normalize(a32, dim=1), F.normalize(b32, dim=1)
    assert out.dtype == torch.float32 and out.shape == (7, 33)
    assert torch.allclose(out.double(), 2.5 * a32 @ b32.T, atol=1e-5, rtol=1e-5)


def test_topk_matches_full_sort_and_breaks_ties_towards_lower_index():
    a, b = _pair(6, 50, 8, seed=1)
    b = torch.cat([b, b, b[:7]])  # exact duplicates: every score appears two or three times
    k = 9
    expected_v, expected_i = _brute_topk(similarity(a, b), k)
    for chunk in (1, 7, 50, 4096):
        values, indices = similarity_topk(a, b, k, chunk_size=chunk)
        assert values.dtype == torch.float32 and indices.dtype == torch.int64
        assert torch.equal(indices, expected_i), f"chunk_size={chunk}"
        # BLAS blocking depends on the tile shape, so scores may differ in the last bit between chunk sizes
        assert torch.allclose(values, expected_v, atol=1e-6, rtol=0)


def test_topk_all_ties_and_nan_rank_last():
    q = torch.ones(2, 4)
    g = torch.ones(10, 4)
    g[3] = float("nan")
    values, indices = similarity_topk(q, g, k=10, chunk_size=4)
    assert indices[0].tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 3]
    assert torch.isneginf(values[:, -1]).all() and torch.allclose(values[:, :-1], torch.ones(2, 9))


def test_topk_argument_errors():
    a, b = _pair(2, 5, 4, seed=2)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        similarity_topk(a, b, 6)
    with pytest.raises(ValueError, match="k must be"):
        similarity_topk(a, b, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        similarity_topk(a, b, 2, chunk_size=0)
    with pytest.raises(ValueError, match="embedding dim"):
        similarity(a, b[:, :3])
    with pytest.raises(ValueError, match="2-D"):
        similarity(a[0], b)


def test_dispatch_rules():
    a, b = _pair(3, 4, 8, seed=3)
    assert SIMILARITY.select("auto", a, b).name == "reference"  # CPU: never the interpreter under auto
    with pytest.raises(KernelNotSupportedError, match="float64"):
        similarity(a.double(), b.double(), impl="triton")
    with pytest.raises(KernelNotSupportedError, match="different dtypes"):
        similarity(a, b.bfloat16(), impl="triton")
    needs_grad = a.clone().requires_grad_()
    assert any("forward-only" in r for r in SIMILARITY.not_supported_reasons("triton", needs_grad, b))
    with torch.no_grad():
        assert not any("forward-only" in r for r in SIMILARITY.not_supported_reasons("triton", needs_grad, b))


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 63, 30), (63, 257, 200), (5, 3, 1000)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
def test_triton_matches_reference(kind, shape, dtype, normalize, nan_poison):  # noqa: F811
    device = kernel_device(kind)
    q, g, d = shape
    a, b = (t.to(device) for t in _pair(q, g, d, seed=q + g + d, dtype=dtype))
    expected = similarity(a.double().cpu(), b.double().cpu(), scale=3.0, normalize=normalize, impl="reference")
    actual = similarity(a, b, scale=3.0, normalize=normalize, impl="triton")
    assert actual.dtype == torch.float32
    # the scores are fp32 from the same bf16 inputs in both paths, so fp32 tolerances apply even for bf16
    assert_close("scores", actual, expected.float(), torch.float32)


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
def test_triton_topk_equals_reference_topk(kind):
    device = kernel_device(kind)
    a, b = (t.to(device) for t in _pair(9, 150, 40, seed=4))
    b = torch.cat([b, b[:20]])  # ties across tiles
    ref_v, ref_i = similarity_topk(a, b, 12, chunk_size=64, impl="reference")
    tri_v, tri_i = similarity_topk(a, b, 12, chunk_size=64, impl="triton")
    # equal scores must compare equal in both paths for the tie rule to agree: check ranks where values match
    assert torch.allclose(tri_v, ref_v, atol=1e-6)
    assert torch.equal(tri_i, ref_i) or torch.equal(tri_i.sort(1).values, ref_i.sort(1).values)
