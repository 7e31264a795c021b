"""Helpers shared by the Triton modules. Importing this module imports triton: only ``*_triton.py`` modules (and
``aot.py``) do.

* ``INTERPRET`` is read once, at import: TRITON_INTERPRET must already be set when triton is first imported (the
  ``tl`` builtins bind at import), so it cannot change afterwards anyway.
* ``fp32_dot_precision()``: what an fp32 ``tl.dot`` computes in, following torch's own setting for cuBLAS.
* ``autotune``: ``triton.autotune`` over the sm_90 configurations on a GPU, one fixed configuration under the
  interpreter (several configurations there would need a benchmarking driver, and the interpreter has none).
* ``grouped_tile``: grouped ("swizzled") program ids, so programs that run at the same time share row slabs and
  column tiles in L2.
* ``launch``: every kernel launch of the package goes through it, so ``aot.py`` can record the launches the real
  host code makes (arguments, strides, alignment) and compile exactly those kernels for sm_90 without a GPU.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .precision import cuda_matmul_allows_tf32


def _read_interpret() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases only read the environment variable
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


INTERPRET: bool = _read_interpret()

# Under the interpreter tl.dot on bf16 operands returns garbage (the interpreter stores bf16 as uint16 and
# np.matmul's them): kernels upcast dot operands to fp32 there. DOT_FP32 is a constexpr, so on a GPU the branch is
# compiled away and the operands stay 16-bit (wgmma on sm_90; tests/test_kernels_aot.py checks the PTX).
DOT_FP32: bool = INTERPRET

# The interpreter's fp32 -> bf16 cast truncates (and its explicit "rtne" mode carries into the exponent wrongly),
# where a GPU rounds to nearest even: cast_rtne rounds the bits itself there, so CPU tests see GPU numerics.
_EMULATE_BF16_RTNE = tl.constexpr(INTERPRET)

MAX_GRID_PROGRAMS = 2**31 - 1  # grid dimension 0 on CUDA (dimensions 1 and 2 stop at 65,535)
SM90_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_block_k(dim: int, cap: int = 64) -> int:
    """K tile for tl.dot: a power of two in [16, cap] (sm_90 needs K >= 16 for 16-bit dots; <= 256 fits smem)."""
    return max(16, min(cap, next_pow2(dim)))


def is_fma_dot(dtype: torch.dtype, precision: str) -> bool:
    """An IEEE fp32 dot runs on FMA units, not tensor cores: each thread then holds whole operand rows and columns
    in registers, so those kernels need smaller tiles (aot.py measured 128 x 64 x 64 spilling)."""
    return dtype == torch.float32 and precision == "ieee"


def logit_block_mk(dim: int, dtype: torch.dtype, precision: str) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) the host fixes for the logit kernels: 128 x 64 on tensor cores, 64 x 32 for FMA dots."""
    if INTERPRET:
        return 64, dot_block_k(dim, 64)
    return (64, dot_block_k(dim, 32)) if is_fma_dot(dtype, precision) else (128, dot_block_k(dim, 64))


def device_guard(t: torch.Tensor):
    """Launch on the tensor's CUDA device (a no-op context on CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """fp32 ``x`` -> ``dtype`` rounding to nearest even, as the GPU's conversion does (see _EMULATE_BF16_RTNE)."""
    if _EMULATE_BF16_RTNE and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# --- precision ---------------------------------------------------------------------------------------------------

def fp32_dot_precision() -> str:
    """``input_precision`` of the fp32 ``tl.dot``s: "tf32" when torch allows TF32 for CUDA matmuls, else "ieee".

    16-bit operands ignore it (tensor cores, fp32 accumulation). The interpreter computes fp32 dots exactly in either
    mode, so CPU tests cannot see TF32's ~1e-3 error; tests/test_kernels_precision.py checks this decision instead.
    """
    return "tf32" if cuda_matmul_allows_tf32() else "ieee"


def dot_precision(dtype: torch.dtype) -> str:
    return fp32_dot_precision() if dtype == torch.float32 else "ieee"


# --- autotuning --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfigs:
    """The configurations one kernel is tuned over on sm_90, and the interpreter's single one.

    ``gpu``: for dots of 16-bit operands on tensor cores. ``tf32``: fp32 operands on tensor cores (twice the bytes per
    staged tile, so fewer configurations fit). ``fma``: IEEE fp32 dots, which run on FMA units with each thread
    holding whole operand rows and columns in registers, so they need other tiles. An empty list falls back to
    ``gpu``. ``smem_operands(meta)`` returns (rows, cols) pairs of the tiles one pipeline stage keeps in shared
    memory (``meta``: the config's meta-parameters over the ones the host passes), so configurations that cannot fit
    sm_90's 227 KiB for the launch's dtype are pruned before tuning. The lists are what aot.py compiled without
    register spills (tests/test_kernels_aot.py keeps it so).
    """

    gpu: Sequence[triton.Config]
    interpret: triton.Config
    smem_operands: Callable[[dict], Sequence[tuple[int, int]]]
    key: Sequence[str]
    tf32: Sequence[triton.Config] = ()
    fma: Sequence[triton.Config] = ()
    operand: str = "A"  # the argument whose dtype the staged tiles have
    reset_to_zero: Sequence[str] = ()
    restore_value: Sequence[str] = ()
    #: ``exclude(meta) -> bool`` drops a configuration for one launch variant (``meta``: the launch's constexprs and
    #: the config's), e.g. one that spills only there
    exclude: Callable[[dict], bool] | None = None

    def configs(self) -> list[triton.Config]:
        if INTERPRET:
            return [self.interpret]
        unique = {id(c): c for c in (*self.gpu, *self.tf32, *self.fma)}
        return list(unique.values())

    def for_launch(self, elem: int, precision: str | None) -> Sequence[triton.Config]:
        """The list a launch with ``elem``-byte operands and this dot precision is tuned over."""
        if elem == 4:
            chosen = self.fma if precision == "ieee" else self.tf32
            return chosen or self.gpu
        return self.gpu

    def prune(self, configs: Sequence[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        """The launch's list (tensor-core or FMA), minus configurations whose pipelined operand tiles exceed sm_90's
        shared memory for this dtype and the ones ``exclude`` rules out."""
        if INTERPRET:
            return list(configs)
        elem = _element_size(named_args[self.operand])
        allowed = {id(c) for c in self.for_launch(elem, kwargs.get("PRECISION"))}
        kept = [c for c in configs if id(c) in allowed and smem_estimate(self, c, elem, kwargs) <= SM90_SHARED_LIMIT
                and not (self.exclude and self.exclude({**kwargs, **c.kwargs}))]
        if not kept:
            raise ValueError(f"no configuration fits sm_90 shared memory for {elem}-byte operands")
        return kept


def _element_size(t) -> int:
    return torch.empty((), dtype=t.dtype).element_size() if isinstance(t, torch.Tensor) else 4


def smem_estimate(tiles: TileConfigs, config: triton.Config, elem: int, launch_meta: dict | None = None) -> int:
    """Bytes of shared memory the software pipeline needs: num_stages copies of every dot operand tile.

    ``launch_meta``: the meta-parameters the host passes itself (BLOCK_K, a fixed BLOCK_M), merged under the config's.
    """
    stages = max(1, config.num_stages or 1)
    meta = {**(launch_meta or {}), **config.kwargs}
    return stages * elem * sum(r * c for r, c in tiles.smem_operands(meta))


def autotune(tiles: TileConfigs):
    """``triton.autotune`` over ``tiles.configs()`` keyed on ``tiles.key`` (the tuner adds every tensor's dtype)."""
    return triton.autotune(configs=tiles.configs(), key=list(tiles.key), prune_configs_by={
        "early_config_prune": tiles.prune}, reset_to_zero=list(tiles.reset_to_zero) or None,
        restore_value=list(tiles.restore_value) or None)


def config(num_warps: int, num_stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# --- scheduling --------------------------------------------------------------------------------------------------

@triton.jit
def grouped_tile(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M row blocks at a time, in int64.

    Consecutive programs (the ones resident together) walk the columns of a band of GROUP_M row blocks, so each row
    slab is read from HBM once per band and each column tile once per band, instead of once per row block.
    Works elementwise on a block of program ids too (tests/test_kernels_offsets.py checks it beyond 65,535).
    """
    pid = pid.to(tl.int64)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    within = pid % width
    return first_m + within % size_m, within // size_m


def grouped_tile_host(pid: int, grid_m: int, grid_n: int, group_m: int) -> tuple[int, int]:
    """The same mapping in Python integers (the tests' oracle)."""
    width = group_m * grid_n
    first_m = (pid // width) * group_m
    size_m = min(grid_m - first_m, group_m)
    within = pid % width
    return first_m + within % size_m, within // size_m


def tiles_grid(rows: int, cols: int, block_m: int, block_n: int) -> tuple[int, int, int]:
    """(row tiles, column tiles, programs) of a one-program-per-tile launch on grid dimension 0."""
    grid_m, grid_n = triton.cdiv(rows, block_m), triton.cdiv(cols, block_n)
    programs = grid_m * grid_n
    if programs > MAX_GRID_PROGRAMS:
        raise ValueError(f"{rows} x {cols} needs {programs} programs of {block_m} x {block_n}, more than CUDA's "
                         f"{MAX_GRID_PROGRAMS}; split the problem (similarity() does this itself)")
    return grid_m, grid_n, programs


# --- launches (recordable for ahead-of-time compilation) ---------------------------------------------------------

@dataclass
class Launch:
    """One kernel launch as the host code made it: the kernel (JIT function or autotuner) and its arguments."""

    kernel: object
    args: tuple
    kwargs: dict


_recording: list[Launch] | None = None


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or, inside :func:`record_launches`, only remember the call."""
    if _recording is not None:
        _recording.append(Launch(kernel, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Run the host code of the Triton paths without a GPU: launches are recorded, outputs stay unwritten."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous
