"""Helpers shared by the Triton modules. Importing this module imports triton: only ``*_triton.py`` modules do.

``INTERPRET`` is read once, at import: TRITON_INTERPRET must already be set when triton is first imported
(tl builtins bind at import), so it cannot change afterwards anyway.
"""
from __future__ import annotations

import torch
import triton

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

# Under the interpreter tl.dot on bf16 operands returns garbage (the interpreter stores bf16 as uint16 and
# np.matmul's them): kernels upcast dot operands to fp32 there. On GPU the operands stay 16-bit (tensor cores).
DOT_FP32: bool = INTERPRET


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_block_k(dim: int, cap: int = 128) -> int:
    """K tile for tl.dot: a power of two in [16, cap] (sm_90 needs K >= 16 for 16-bit dots; <= 256 fits smem)."""
    return max(16, min(cap, next_pow2(dim)))


def device_guard(t: torch.Tensor):
    """Launch on the tensor's CUDA device (a no-op context on CPU tensors under the interpreter)."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
