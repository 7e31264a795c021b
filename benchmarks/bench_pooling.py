"""Last-token pooling + L2 norm: achieved memory bandwidth of the forward.

Bytes moved by the forward = pooled rows read (B*D) + pooled rows written (B*D) + the mask rows scanned (B*T) +
the saved indices (B*8). The rest of ``hidden`` is never touched, so T only matters through the mask. On CUDA the
figure is compared with the device's HBM peak (datasheet) and with a measured device-to-device copy; on CPU only
the reference path runs (Triton needs a GPU) and the number is informational.
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
    from vladva_openclip.kernels import last_token_pool

    b, t, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(b, t, d, device=device, generator=gen, dtype=torch.float32).to(dtype)
    lengths = torch.randint(1, t + 1, (b,), device=device, generator=gen)
    mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).to(torch.int64)  # right padding
    with torch.no_grad():
        ms = H.time_ms(lambda: last_token_pool(hidden, mask, normalize=True, impl=impl), device, repeats=5)
    gbps = forward_bytes(b, t, d, dtype, mask.dtype) / (ms * 1e-3) / 1e9
    return {"ms": ms, "gbps": gbps}
