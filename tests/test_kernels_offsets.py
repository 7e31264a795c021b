"""Index arithmetic at sizes the GPU will see: grids beyond 65,535 blocks and flat offsets beyond 2^31.

* The grouped program-id mapping (``grouped_tile``) is run by a probe kernel under the interpreter on blocks of
  program ids far beyond 65,535 and compared with its Python twin (a bijection onto the tiles).
* Every launch of the package uses grid dimension 0 only (up to 2^31 - 1 programs; dimension 1 stops at 65,535).
* Offsets past 2^31 elements run end to end through the real kernels: under the interpreter on tensors backed by a
  sparse file (only the touched pages take memory, so a 4-10 GiB tensor costs a few MiB; base pointers sit 2^31
  elements into the mapping, so an offset that wrapped around in int32 reads or writes inside it: wrong values, a
  clean assertion failure, not a crash), and natively on a GPU with real allocations (~27 GiB at most, uninitialised
  except for the rows the test writes).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from _helpers_kernels import KERNEL_DEVICES, kernel_device

INT32_LIMIT = 2**31


triton = pytest.importorskip("triton", reason="triton is not installed (the kernels need it)")
import triton.language as tl
from vladva_openclip.kernels._triton_common import grouped_tile


@triton.jit
def _grouped_tile_probe(OUT_M, OUT_N, total, grid_m, grid_n, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """The kernels' program-id mapping, evaluated on BLOCK program ids at once."""
    pid = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tile_m, tile_n = grouped_tile(pid, grid_m, grid_n, GROUP)
    tl.store(OUT_M + pid, tile_m, mask=pid < total)
    tl.store(OUT_N + pid, tile_n, mask=pid < total)


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
@pytest.mark.parametrize("grid_m,grid_n,group", [(300, 701, 8), (3, 70000, 8), (70001, 2, 8), (13, 17, 4)])
def test_grouped_tile_is_a_bijection_beyond_65535_programs(kind, grid_m, grid_n, group):
    from vladva_openclip.kernels._triton_common import grouped_tile_host

    device = kernel_device(kind)
    total = grid_m * grid_n
    out_m = torch.full((total,), -1, dtype=torch.int64, device=device)
    out_n = torch.full((total,), -1, dtype=torch.int64, device=device)
    block = 4096
    _grouped_tile_probe[(-(-total // block),)](out_m, out_n, total, grid_m, grid_n, GROUP=group, BLOCK=block)
    out_m, out_n = out_m.cpu(), out_n.cpu()
    assert (out_m >= 0).all() and (out_m < grid_m).all() and (out_n >= 0).all() and (out_n < grid_n).all()
    flat = out_m * grid_n + out_n
    assert torch.unique(flat).numel() == total, "two programs got the same tile"
    for pid in (0, 1, min(total, group * grid_n) - 1, total // 2, total - 1):
        assert (out_m[pid].item(), out_n[pid].item()) == grouped_tile_host(pid, grid_m, grid_n, group)
    # a band of `group` row blocks is finished before the next starts: resident programs share row slabs
    first_band = out_m[: min(total, group * grid_n)]
    assert first_band.max().item() < group


def test_similarity_grid_is_one_dimensional_beyond_65535_tiles():
    """A gallery of 2.2M rows needs ~68k column tiles of 32: the launch must put them on grid dimension 0 (host
    arithmetic only: the launch is recorded, not run)."""
    from vladva_openclip.kernels import _triton_common as tc
    from vladva_openclip.kernels import similarity_triton as st

    q, g, d = 40, 2_200_000, 16
    a = torch.zeros(1, d).expand(q, d)  # stride 0 rows: shapes of any size without the memory
    b = torch.zeros(1, d).expand(g, d)
    with tc.record_launches() as launches:
        st.similarity_fwd(a, b, 1.0, True, True, out=torch.zeros(1, 1).expand(q, g))
    (launch,) = launches
    m, n = launch.args[4], launch.args[5]
    assert (m, n) == (q, g)
    grid_m, grid_n, programs = tc.tiles_grid(m, n, 32, 32)
    assert grid_n > 65535 and programs == grid_m * grid_n


def test_gallery_is_sliced_when_even_dimension_0_is_too_small():
    from vladva_openclip.kernels import similarity_triton as st

    slices = st.gallery_slices(q=100, g=10_000, max_programs=40)  # 4 row tiles of 32 -> 10 column tiles a slice
    assert slices[0] == (0, 320) and slices[-1][1] == 10_000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))
    assert st.gallery_slices(q=100, g=10_000) == [(0, 10_000)]
    with pytest.raises(ValueError, match="more than CUDA"):
        from vladva_openclip.kernels._triton_common import tiles_grid

        tiles_grid(2**20, 2**20, 16, 16)


# --- offsets past 2^31 through the real kernels ------------------------------------------------------------------

@pytest.fixture
def big(tmp_path):
    """``big(kind)`` -> ``make(numel, dtype)``: a large 1-D tensor for the kernel device of ``kind``, and the margin
    (elements) views start at. CPU: zeros backed by a sparse file, views MARGIN into it. CUDA: an uninitialised
    allocation, views at its start."""
    made = []

    def for_kind(kind: str):
        device = kernel_device(kind)

        def make(numel: int, dtype: torch.dtype) -> torch.Tensor:
            if device == "cuda":
                t = torch.empty(numel, dtype=dtype, device=device)
            else:
                path = tmp_path / f"sparse{len(made)}.bin"
                with open(path, "wb") as f:
                    f.truncate((MARGIN + numel) * torch.empty((), dtype=dtype).element_size())
                t = torch.from_file(str(path), shared=True, size=MARGIN + numel, dtype=dtype)[MARGIN:]
            made.append(t)
            return t

        return device, make

    return for_kind


MARGIN = INT32_LIMIT + 4096  # CPU: elements before a view's base, so an int32-wrapped offset lands inside the file


def _far_rows(make, rows: torch.Tensor, row_stride: int) -> torch.Tensor:
    """A [n, D] view with row i at i * row_stride elements from row 0, holding ``rows`` (moved to the device)."""
    n, d = rows.shape
    storage = make((n - 1) * row_stride + d, rows.dtype)
    view = storage.as_strided((n, d), (row_stride, 1))
    view.copy_(rows)
    return view


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
def test_contrastive_with_row_offsets_beyond_int32(kind, big):
    """Row i of the features sits i * 2^30 elements from the first: rows 2 and 3 are past 2^31 elements."""
    from vladva_openclip.kernels import contrastive_loss

    device, make = big(kind)
    gen = torch.Generator().manual_seed(0)
    n, d = 4, 32
    img = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=gen) + 0.3 * img, dim=1)
    stride = 2**30 + 64
    img_far, txt_far = _far_rows(make, img, stride), _far_rows(make, txt, stride)
    assert (n - 1) * stride > INT32_LIMIT
    results = {}
    for name, (i, t) in {"far": (img_far, txt_far), "near": (img.to(device), txt.to(device))}.items():
        i.requires_grad_()
        t.requires_grad_()
        s = torch.tensor(20.0, requires_grad=True, device=device)
        loss = contrastive_loss(i, t, s, impl="triton")
        results[name] = (loss, *torch.autograd.grad(loss, (i, t, s)))
    for far, near in zip(results["far"], results["near"]):
        assert torch.allclose(far, near, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
def test_scaled_matmul_writes_past_int32_offsets(kind, big):
    """The backward's matmul writes d features rows whose flat offsets pass 2^31 (N * D > 2^31 at the largest
    shapes): an output view with 2^30-element row stride stands in for such a tensor."""
    from vladva_openclip.kernels.contrastive_triton import scaled_matmul

    device, make = big(kind)
    gen = torch.Generator().manual_seed(1)
    x, y = (t.to(device) for t in (torch.randn(5, 24, generator=gen), torch.randn(24, 40, generator=gen)))
    out = _far_rows(make, torch.zeros(5, 40), 2**30 + 128)
    alpha = torch.tensor([0.5], device=device)
    scaled_matmul(x, y, out, alpha)
    expected = x.double() @ y.double()
    assert torch.allclose(out.double(), 0.5 * expected, atol=1e-5)
    scaled_matmul(x, y, out, alpha, accumulate=True)
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
def test_similarity_with_row_offsets_beyond_int32(kind, big):
    from vladva_openclip.kernels import similarity

    device, make = big(kind)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 16, generator=gen), torch.randn(5, 16, generator=gen)
    b_far = _far_rows(make, b, 2**30 + 32)
    expected = similarity(a, b, impl="reference")
    assert torch.allclose(similarity(a.to(device), b_far, impl="triton").cpu(), expected, atol=1e-5)


@pytest.mark.parametrize("kind", KERNEL_DEVICES)
def test_pooling_forward_and_backward_beyond_int32(kind, big, monkeypatch):
    """hidden [3, T, 2048] bf16 with B * T * D > 2^31: the pooled rows of sequences 1 (through the position term)
    and 2 (through the row term) and their gradients live past 2^31 elements, in the input and in the dense
    gradient (on CPU the zero fill is redirected to a sparse file)."""
    from vladva_openclip.kernels import last_token_pool, last_token_pool_ref

    device, make = big(kind)
    b, t, d = 3, 2**19 + 8, 2048
    numel = b * t * d
    positions = [4, t - 4, 0]
    assert (t + positions[1]) * d > INT32_LIMIT and 2 * t * d > INT32_LIMIT
    hidden = make(numel, torch.bfloat16).view(b, t, d)
    mask = torch.zeros(b, t, dtype=torch.int64)
    for row, pos in enumerate(positions):
        mask[row, pos] = 1
        mask[row, max(0, pos - 3):pos] = 1  # a few earlier tokens too; the last one is pooled
    mask = mask.to(device)
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(b, d, generator=gen).bfloat16()
    for row, pos in enumerate(positions):
        hidden[row, pos] = rows[row].to(device)
    pooled = rows.float()  # [b, d]: the rows the mask selects

    real_zeros = torch.zeros

    def sparse_zeros(*shape, dtype=None, device=None, **kw):
        if device is not None and torch.device(device).type == "cpu" and len(shape) == 3 \
                and shape[0] * shape[1] * shape[2] > INT32_LIMIT:
            return make(shape[0] * shape[1] * shape[2], dtype).view(*shape)
        return real_zeros(*shape, dtype=dtype, device=device, **kw)

    monkeypatch.setattr(torch, "zeros", sparse_zeros)
    h = hidden.requires_grad_()
    out = last_token_pool(h, mask, impl="triton")
    ref_x = pooled.clone().requires_grad_()
    expected = last_token_pool_ref(ref_x[:, None], torch.ones(b, 1, dtype=torch.int64))
    assert torch.allclose(out.float().cpu(), expected, atol=1e-2)
    grad = torch.randn(b, d, generator=gen).bfloat16()
    (dh,) = torch.autograd.grad(out, h, grad.to(device))
    expected.backward(grad.float())
    for row, pos in enumerate(positions):
        assert torch.allclose(dh[row, pos].float().cpu(), ref_x.grad[row], atol=2e-2), f"row {row}"
        assert dh[row, pos + 1].abs().sum() == 0
