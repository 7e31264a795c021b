"""Precision modes of the kernels and torch's fp32 matmul setting, without importing triton.

A *mode* names what the benchmark, the AOT check and the tests run: the features' dtype, and for fp32 whether TF32
is allowed, or whether the features enter under ``torch.autocast(dtype=torch.bfloat16)`` as in training. What each
mode computes in is in kernels/README.md ("Precision modes").
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: feature dtype of each mode; "tf32" is fp32 with TF32 allowed, "amp_bf16" fp32 features under bf16 autocast
MODE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                                       "tf32": torch.float32, "amp_bf16": torch.float32}


def cuda_matmul_allows_tf32() -> bool:
    """Whether torch lets cuBLAS run fp32 matmuls in TF32 (the rule ClipLoss's matmuls follow).

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee", "none" = inherit); older
    releases the ``allow_tf32`` flag and ``torch.set_float32_matmul_precision`` ("highest" = IEEE). torch raises
    when the legacy getters are read after the new API was used, so the new one is asked first.
    """
    matmul = torch.backends.cuda.matmul
    for getter in (lambda: getattr(matmul, "fp32_precision", "none"),
                   lambda: getattr(torch.backends, "fp32_precision", "none")):
        try:
            value = getter()
        except (RuntimeError, AttributeError):
            continue
        if value in ("tf32", "ieee"):
            return value == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return torch.get_float32_matmul_precision() != "highest"


@contextlib.contextmanager
def fp32_matmul(tf32: bool) -> Iterator[None]:
    """TF32 allowed (or not) for CUDA fp32 matmuls inside the block; the previous setting is restored after."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
        return
    old = matmul.allow_tf32
    matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        matmul.allow_tf32 = old


@contextlib.contextmanager
def mode_context(mode: str, device_type: str) -> Iterator[None]:
    """Run a block the way ``mode`` prescribes: TF32 on for "tf32" (off otherwise), bf16 autocast for "amp_bf16"."""
    if mode not in MODE_DTYPES:
        raise ValueError(f"unknown precision mode {mode!r}; choose from {sorted(MODE_DTYPES)}")
    with fp32_matmul(mode == "tf32"), torch.autocast(device_type, dtype=torch.bfloat16, enabled=mode == "amp_bf16"):
        yield
