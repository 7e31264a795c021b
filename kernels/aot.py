"""Ahead-of-time compilation of every kernel configuration for a GPU target, without a GPU.

``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` runs the whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin with the bundled ptxas) on a CPU-only machine, so shared-memory overflows and dot-shape errors of the GPU
configurations surface in CI. Used by tests/test_kernels_aot.py and ``python -m benchmarks.bench_kernels --aot``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    dtype: str
    shared_bytes: int
    seconds: float


_SIZE_NAMES = ("M", "N", "K", "T", "D")


def _signature(fn, data: str, constexprs: dict, fp32_ptrs: tuple[str, ...] = (), i64_ptrs: tuple[str, ...] = (),
               fp32_scalars: tuple[str, ...] = ()) -> dict[str, str]:
    """Triton signature from the kernel's argument names. Convention of our kernels: UPPERCASE arguments are
    pointers (to ``data`` unless listed) except the sizes M, N, K, T, D; ``stride_*`` are int64; other scalars are
    int32 unless listed in ``fp32_scalars``."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.isupper() and name not in _SIZE_NAMES:
            sig[name] = "*fp32" if name in fp32_ptrs else "*i64" if name in i64_ptrs else data
        elif name.startswith("stride"):
            sig[name] = "i64"
        else:
            sig[name] = "fp32" if name in fp32_scalars else "i32"
    return sig


def _gpu_cases(dtype: torch.dtype, dim: int) -> list[tuple[str, object, dict, dict, dict]]:
    """(name, jit fn, signature, constexprs, launch options) of every GPU configuration for ``dtype`` and ``dim``."""
    from . import contrastive_triton as ct
    from . import pooling_triton as pt
    from . import similarity_triton as st
    from ._triton_common import dot_block_k

    data = "*" + _DTYPE_NAMES[dtype]
    block_k = dot_block_k(dim, 64)
    gemm_launch = {"num_warps": 8, "num_stages": 3}
    cases = []
    for col_stats in (True, False):
        consts = {"COL_STATS": col_stats, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": block_k, "DOT_FP32": False,
                  "PRECISION": "ieee"}
        sig = _signature(ct.contrastive_fwd_kernel, data, consts,
                         fp32_ptrs=("SCALE", "ROW_MAX", "ROW_LOGSUM", "ROW_POS", "COL_MAX", "COL_LOGSUM"))
        cases.append((f"contrastive_fwd(col_stats={col_stats})", ct.contrastive_fwd_kernel, sig, consts, gemm_launch))
    consts = {"HAS_ROW": True, "HAS_COL": True, "NEED_DSCALE": True, "BLOCK_M": 128, "BLOCK_N": 128,
              "BLOCK_K": block_k, "DOT_FP32": False, "PRECISION": "ieee"}
    sig = _signature(ct.contrastive_grad_kernel, data, consts, fp32_ptrs=("SCALE", "ROW_STATS", "COL_STATS", "DSCALE"),
                     fp32_scalars=("coef", "diag_coef"))
    cases.append(("contrastive_grad", ct.contrastive_grad_kernel, sig, consts, gemm_launch))
    consts = {"NORM_A": True, "NORM_B": True, "EPS": 1e-12, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": block_k,
              "DOT_FP32": False}
    sig = _signature(st.similarity_fwd_kernel, data, consts, fp32_ptrs=("OUT",), fp32_scalars=("scale",))
    cases.append(("similarity", st.similarity_fwd_kernel, sig, consts, gemm_launch))

    block_d = pt._block_d(dim)
    row_launch = {"num_warps": pt._num_warps(block_d)}
    consts = {"NORMALIZE": True, "EPS": 1e-12, "BLOCK_T": 1024, "BLOCK_D": block_d}
    sig = _signature(pt.last_token_pool_fwd_kernel, data, consts, i64_ptrs=("MASK", "IDX"))
    cases.append(("last_token_pool_fwd", pt.last_token_pool_fwd_kernel, sig, consts, row_launch))
    consts = {"NORMALIZE": True, "EPS": 1e-12, "BLOCK_D": block_d}
    sig = _signature(pt.last_token_pool_bwd_kernel, data, consts, i64_ptrs=("IDX",))
    cases.append(("last_token_pool_bwd", pt.last_token_pool_bwd_kernel, sig, consts, row_launch))
    return cases


def compile_all(dtype: torch.dtype = torch.bfloat16, dim: int = 4096, arch: int = 90,
                only: tuple[str, ...] | None = None) -> list[CompiledKernel]:
    """Compile every GPU kernel configuration for ``cuda:sm_<arch>``; raises on any compile/resource error.

    Shared memory is checked against the target's limit by the compiler when the kernel is loaded on a device;
    here the caller compares ``shared_bytes`` with the SM's capacity (228 KiB on H100, 227 KiB usable per block).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results = []
    for name, fn, sig, constexprs, opts in _gpu_cases(dtype, dim):
        if only and not any(name.startswith(o) for o in only):
            continue
        start = time.perf_counter()
        # constexpr values appear both in the signature (as "constexpr") and in the constexprs dict
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=target, options=opts)
        results.append(CompiledKernel(name, _DTYPE_NAMES[dtype], int(compiled.metadata.shared),
                                      time.perf_counter() - start))
    return results


SM90_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def main(argv: list[str] | None = None) -> int:
    """``python -m vladva_openclip.kernels.aot [--dim 4096] [--arch 90]``: compile all, print shared memory."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    failed = False
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for r in compile_all(dtype, args.dim, args.arch):
            over = r.shared_bytes > SM90_SHARED_LIMIT
            failed |= over
            print(f"{r.name:36s} {r.dtype:5s} shared={r.shared_bytes:7d} B{'  OVER LIMIT' if over else ''}"
                  f"  ({r.seconds:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
