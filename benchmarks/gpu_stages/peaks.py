"""Datasheet peaks of the GPUs the check is meant for, looked up from ``torch.cuda.get_device_name()``.

Dense (no sparsity) bf16 tensor-core TFLOP/s and HBM bandwidth in GB/s (1e9 B/s), from the vendor datasheets of
the SXM / PCIe / NVL parts. The first entry whose key is contained in the device name wins, so the more specific
names come first. The check also measures a bf16 matrix product and a device-to-device copy (stage ``env``) and
reports figures against both.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    key: str
    bf16_tflops: float
    hbm_gbps: float


PEAKS: tuple[Peak, ...] = (
    Peak("GH200", 989.0, 4000.0),  # before "H200", which it contains
    Peak("H200 NVL", 835.0, 4800.0),
    Peak("H200", 989.0, 4800.0),
    Peak("H100 NVL", 835.0, 3900.0),
    Peak("H100 PCIe", 756.0, 2000.0),
    Peak("H100", 989.0, 3350.0),  # "NVIDIA H100 80GB HBM3": the SXM5 part
    Peak("H800", 989.0, 3350.0),
    Peak("B200", 2250.0, 8000.0),
    Peak("A100-SXM4-80GB", 312.0, 2039.0),
    Peak("A100-SXM4-40GB", 312.0, 1555.0),
    Peak("A100 80GB PCIe", 312.0, 1935.0),
    Peak("A100", 312.0, 1555.0),
    Peak("L40S", 362.0, 864.0),
)


def lookup(device_name: str) -> Peak | None:
    """The datasheet peaks of ``device_name`` (e.g. ``"NVIDIA H200"``), or None for an unknown device."""
    name = device_name.lower()
    for peak in PEAKS:
        if peak.key.lower() in name:
            return peak
    return None
