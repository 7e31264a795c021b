"""Last-token pooling + L2 norm: the Triton kernel against torch's gather-and-normalize (the reference path, which
``impl="auto"`` runs on every device).

Bytes moved by the forward = pooled rows read (B*D) + pooled rows written (B*D) + the mask rows scanned (B*T) +
the saved indices (B*8). The rest of ``hidden`` is never touched, so T only matters through the mask. On CUDA the
figure is compared with the device's HBM peak (datasheet) and with a measured device-to-device copy. The
forward+backward time includes the dense [B, T, D] zero fill of the gradient, the same in both paths. On CPU only
the torch path is timed (the Triton path would run in the interpreter, which measures numpy, not the kernel).
"""
from __future__ import annotations

import torch

from benchmarks import _harness as H

# datasheet HBM bandwidth, GB/s (1e9 B/s), matched against torch.cuda.get_device_name()
HBM_PEAK_GBPS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
                 "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935}

GPU_SHAPES = [(65536, 8, 4096), (4096, 700, 4096), (1024, 700, 1536)]
CPU_SHAPES = [(4096, 8, 4096), (1024, 700, 1536)]


def hbm_peak_gbps() -> float | None:
    name = torch.cuda.get_device_name()
    for key, value in HBM_PEAK_GBPS.items():
        if key.lower() in name.lower():
            return float(value)
    return None


def copy_gbps(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write counted)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = H.time_ms(lambda: y.copy_(x), "cuda")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def forward_bytes(b: int, t: int, d: int, dtype: torch.dtype, mask_dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * b * d * item + b * t * torch.empty((), dtype=mask_dtype).element_size() + 8 * b


def measure(shape: tuple[int, int, int], dtype: torch.dtype, device: str, impl: str) -> dict:
    """Forward time and bandwidth, forward+backward time, the implementation that ran, and its result checked
    against the torch path on the same inputs."""
    from vladva_openclip.kernels import LAST_TOKEN_POOL, last_token_pool, last_token_pool_ref

    b, t, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(b, t, d, device=device, generator=gen, dtype=torch.float32).to(dtype)
    lengths = torch.randint(1, t + 1, (b,), device=device, generator=gen)
    mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).to(torch.int64)  # right padding
    ran = LAST_TOKEN_POOL.select(impl, hidden, mask, True).name
    with torch.no_grad():
        ms = H.time_ms(lambda: last_token_pool(hidden, mask, normalize=True, impl=impl), device, repeats=5)
    gbps = forward_bytes(b, t, d, dtype, mask.dtype) / (ms * 1e-3) / 1e9
    leaf = hidden.detach().requires_grad_()
    grad = torch.randn(b, d, device=device, generator=gen).to(dtype)

    def fwd_bwd():
        return torch.autograd.grad(last_token_pool(leaf, mask, normalize=True, impl=impl), leaf, grad)[0]

    ms_fb = H.time_ms(fwd_bwd, device, repeats=3)
    out, ref = last_token_pool(hidden, mask, impl=impl), last_token_pool_ref(hidden.float(), mask)
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    ok = err <= (1e-5 if dtype == torch.float32 else 1e-2)
    return {"ms": ms, "gbps": gbps, "ms_fwd_bwd": ms_fb, "impl": ran,
            "check": f"{'ok' if ok else 'over tolerance'} (max rel {err:.1e})"}
