"""Ahead-of-time compilation, for sm_90 and without a GPU, of exactly the kernels the benchmark and training launch.

How it gets "exactly":

1. **The real host code runs.** Each :class:`Scenario` drives the package's own host paths (the contrastive
   autograd function with :class:`.contrastive_triton.TritonBackend`, ``similarity_fwd``, the pooling function) on
   CPU tensors of the benchmark's shapes and dtypes, inside :func:`._triton_common.record_launches`: every launch is
   recorded with its real arguments (views, strides, the per-chunk slices) instead of run.
2. **Bound as the JIT binds it.** Each recorded launch goes through triton's own binder
   (``create_function_from_signature`` + ``JITFunction._pack_args``, what ``kernel[grid](...)`` calls), so pointer
   alignment, integers divisible by 16 and unit strides become the same compile-time facts as at a real launch
   (``cp.async`` vector loads, constant strides): the kernel compiled here is the one the JIT would build.
3. **Every autotune configuration** the launch could pick (the configuration list after the shared-memory prune the
   autotuner applies) is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``. Identical
   specialisations (same binder result and options) are compiled once.
4. **Resources** are read from the cubin with the ``cuobjdump`` that ships with triton (``--dump-resource-usage``):
   registers per thread, stack frame (where ptxas spills), local memory, shared memory; ``metadata.shared`` gives the
   dynamic shared memory. 16-bit ``tl.dot`` kernels must show tensor-core instructions (``wgmma`` on sm_90, ``mma``
   before): the interpreter's fp32 upcast (``DOT_FP32``) must be compiled away.

Needs triton with its bundled ptxas/cuobjdump (every Linux x86-64 wheel has them), and the private binder API of
triton 3.4-3.8 (checked: a clear error otherwise). ``TRITON_INTERPRET`` must be unset: compiling needs the real
backend. CLI: ``python -m vladva_openclip.kernels.aot [--modes bf16,amp_bf16,fp32,tf32] [--dim D] [--only PREFIX]
[--json out.json] [--workers N]``; exit status 1 if any kernel spills, overflows shared memory or runs a 16-bit dot
off tensor cores.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._triton_common import SM90_SHARED_LIMIT
from .precision import MODE_DTYPES, fp32_matmul

#: what the benchmark (benchmarks/bench_kernels.py) and training (bf16 autocast or bf16 features, TF32 on) run
DEFAULT_MODES = ("bf16", "amp_bf16", "fp32", "tf32")
#: recorded problem sizes: every N and D divisible by 16 binds to the same specialisations (BLOCK_K is 64, or 32 for
#: IEEE fp32, whenever D >= 64; per-launch offsets and split counts are not specialised on), so two small N suffice
DEFAULT_NS = (1024, 2048)
DEFAULT_DIMS = (1024, 1536, 4096)
POOL_SHAPES = ((4, 8, 4096), (4, 700, 4096), (4, 700, 1536))  # benchmarks/bench_pooling.py's (T, D), small B


@dataclass(frozen=True)
class Scenario:
    """A host path to drive: ``run()`` makes its launches (recorded, not executed)."""

    name: str
    mode: str
    run: Callable[[], None]


@dataclass(frozen=True)
class CompileJob:
    """One kernel specialisation and configuration to compile; ``mode``: the modes that launch it, joined by "+"."""

    kernel: str
    mode: str
    config: str
    scenario: str
    fn: object
    args: tuple
    kwargs: dict
    key: str


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    dtype: str
    config: str
    scenario: str
    shared_bytes: int
    registers: int
    stack_bytes: int
    local_bytes: int
    spill_bytes: int
    tensor_cores: bool
    uses_dot: bool
    seconds: float

    @property
    def spills(self) -> bool:
        """ptxas stored registers to local memory (the stack frame) and loads them back."""
        return self.spill_bytes > 0


# --- scenarios -------------------------------------------------------------------------------------------------

def _contrastive(mode: str, n: int, d: int, local: bool) -> Callable[[], None]:
    def run() -> None:
        from .contrastive import ContrastiveLossFunction
        from .contrastive_triton import TritonBackend

        dtype = MODE_DTYPES[mode]
        compute = torch.bfloat16 if mode == "amp_bf16" else dtype
        img = torch.empty(n, d, dtype=dtype, requires_grad=True)
        txt = torch.empty(n, d, dtype=dtype, requires_grad=True)
        scale = torch.tensor(100.0, requires_grad=True)
        if local:  # rank 1 of 2 with gather_with_grad: every input gets a gradient
            all_img = torch.empty(2 * n, d, dtype=dtype, requires_grad=True)
            all_txt = torch.empty(2 * n, d, dtype=dtype, requires_grad=True)
            loss = ContrastiveLossFunction.apply(TritonBackend(), None, n, compute, scale, img, txt, all_img, all_txt)
        else:
            loss = ContrastiveLossFunction.apply(TritonBackend(), None, 0, compute, scale, img, txt, None, None)
        loss.backward()
    return run


def _similarity(mode: str, n: int, d: int, normalize: bool) -> Callable[[], None]:
    def run() -> None:
        from .similarity_triton import similarity_fwd

        dtype = MODE_DTYPES[mode]
        similarity_fwd(torch.empty(n // 4, d, dtype=dtype), torch.empty(n, d, dtype=dtype), 1.0, normalize, normalize)
    return run


def _pooling(mode: str, shape: tuple[int, int, int], mask_dtype: torch.dtype) -> Callable[[], None]:
    def run() -> None:
        from .pooling_triton import LastTokenPoolFunction

        b, t, d = shape
        hidden = torch.empty(b, t, d, dtype=MODE_DTYPES[mode], requires_grad=True)
        out, _ = LastTokenPoolFunction.apply(hidden, torch.ones(b, t, dtype=mask_dtype), True)
        out.backward(torch.empty_like(out))
    return run


def scenarios(modes: Sequence[str] = DEFAULT_MODES, ns: Sequence[int] = DEFAULT_NS,
              dims: Sequence[int] = DEFAULT_DIMS) -> list[Scenario]:
    """Every host path the benchmark and training take, in each precision mode, at the recorded sizes."""
    out = []
    for mode in modes:
        if mode not in MODE_DTYPES:
            raise ValueError(f"unknown mode {mode!r}; choose from {sorted(MODE_DTYPES)}")
        for n in ns:
            for d in dims:
                out.append(Scenario(f"contrastive global N={n} D={d}", mode, _contrastive(mode, n, d, False)))
                out.append(Scenario(f"contrastive local N={n} D={d}", mode, _contrastive(mode, n, d, True)))
                if mode != "amp_bf16":  # evaluation scores model features (fp32), or 16-bit caches
                    for normalize in (True, False):
                        out.append(Scenario(f"similarity normalize={normalize} Q={n // 4} G={n} D={d}", mode,
                                            _similarity(mode, n, d, normalize)))
        if mode in ("bf16", "fp32"):
            for shape in POOL_SHAPES:
                for mask_dtype in (torch.int64, torch.bool):
                    out.append(Scenario(f"pooling {shape} mask={mask_dtype}", mode, _pooling(mode, shape, mask_dtype)))
    return out


# --- binding and compiling -------------------------------------------------------------------------------------

def _require_compiler() -> None:
    from ._triton_common import INTERPRET

    if INTERPRET:
        raise RuntimeError("TRITON_INTERPRET is set: ahead-of-time compilation needs the real backend "
                           "(run `env -u TRITON_INTERPRET python -m vladva_openclip.kernels.aot`)")


def _binder_api():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as err:  # pragma: no cover - depends on the installed triton
        raise RuntimeError(f"this triton has no JIT binder API the AOT check can reuse ({err}); "
                           "tested with triton 3.4-3.8") from err
    return GPUTarget, ASTSource, make_backend, create_function_from_signature


def _base_fn(kernel):
    """(JIT function, autotuner or None) of a launched kernel object."""
    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, Autotuner):
        fn = kernel.fn
        while not hasattr(fn, "params"):
            fn = fn.fn
        return fn, kernel
    return kernel, None


def _configs(tuner, fn, args: tuple, kwargs: dict):
    """The configurations the autotuner would try for this launch (after its prune), or [None] for a plain kernel."""
    if tuner is None:
        return [None]
    tuner.nargs = dict(zip(tuner.arg_names, args))
    return tuner.prune_configs(kwargs)


def _config_name(cfg) -> str:
    if cfg is None:
        return "fixed"
    meta = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{meta},warps={cfg.num_warps},stages={cfg.num_stages}"


def record_jobs(scenario_list: Sequence[Scenario], arch: int = 90) -> list[CompileJob]:
    """Run the scenarios' host code with launches recorded; one job per distinct (specialisation, configuration)."""
    from ._triton_common import record_launches

    _require_compiler()
    GPUTarget, _, make_backend, create_binder = _binder_api()
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders: dict[int, Callable] = {}
    jobs: dict[str, CompileJob] = {}
    for sc in scenario_list:
        with fp32_matmul(sc.mode == "tf32"), record_launches() as launches:
            sc.run()
        for launch in launches:
            fn, tuner = _base_fn(launch.kernel)
            binder = binders.setdefault(id(fn), create_binder(fn.signature, fn.params, backend))
            for cfg in _configs(tuner, fn, launch.args, launch.kwargs):
                kwargs = {**launch.kwargs, **(cfg.all_kwargs() if cfg is not None else {})}
                _, specialization, _ = binder(*launch.args, **kwargs)
                key = f"{fn.__name__}|{specialization}|{sorted(kwargs.items(), key=str)}"
                if key not in jobs:
                    jobs[key] = CompileJob(fn.__name__, sc.mode, _config_name(cfg), sc.name, fn, launch.args,
                                           kwargs, key)
                elif sc.mode not in jobs[key].mode.split("+"):  # the same binary serves several modes
                    jobs[key] = dataclasses.replace(jobs[key], mode=f"{jobs[key].mode}+{sc.mode}")
    return list(jobs.values())


def _tool(name: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    path = os.path.join(os.path.dirname(get_ptxas(90).path), name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} not found next to triton's ptxas ({path}): the AOT check reads registers and "
                           "spills from the cubin with it")
    return path


def resource_usage(cubin: bytes, kernel: str) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of ``kernel`` in ``cubin``, from ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    match = re.search(rf"Function {re.escape(kernel)}[^:]*:\s*\n\s*(.*)", out)
    if not match:
        raise RuntimeError(f"no resource usage for {kernel} in cuobjdump output:\n{out}")
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", match.group(1))}


def ptxas_spill_bytes(ptx: str, arch: int = 90) -> int:
    """Bytes of spill stores ptxas reports for ``ptx`` (``-v``, the flags triton's own ptxas call uses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    stores = re.findall(r"(\d+) bytes spill stores", out.stderr + out.stdout)
    if not stores:
        raise RuntimeError(f"no spill report in ptxas -v output:\n{out.stderr}")
    return sum(int(v) for v in stores)


_TENSOR_CORE = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\S*\.(bf16|f16|tf32)\b")


def compile_job(job: CompileJob, arch: int = 90) -> CompiledKernel:
    """Compile one job exactly as the JIT would for ``cuda:sm_<arch>`` and read its resources."""
    import triton

    GPUTarget, ASTSource, make_backend, create_binder = _binder_api()
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = job.fn
    bound, specialization, options = create_binder(fn.signature, fn.params, backend)(*job.args, **job.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, job.kwargs, bound, specialization, options)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    usage = resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    stack, local = usage.get("STACK", 0), usage.get("LOCAL", 0)
    # a stack frame is where spills go; ask ptxas how much of it is spills only when there is one (cheap otherwise)
    spill = ptxas_spill_bytes(compiled.asm["ptx"], arch) if stack or local else 0
    return CompiledKernel(
        name=job.kernel, dtype=job.mode, config=job.config, scenario=job.scenario,
        shared_bytes=int(compiled.metadata.shared), registers=usage.get("REG", -1),
        stack_bytes=stack, local_bytes=local, spill_bytes=spill,
        tensor_cores=bool(_TENSOR_CORE.search(compiled.asm["ptx"])), uses_dot="tt.dot" in compiled.asm["ttir"],
        seconds=seconds)


_FORKED_JOBS: list[CompileJob] = []


def _compile_forked(args: tuple[int, int]) -> CompiledKernel:
    index, arch = args
    return compile_job(_FORKED_JOBS[index], arch)


def compile_jobs(jobs: Sequence[CompileJob], arch: int = 90, workers: int = 1,
                 progress: bool = False) -> list[CompiledKernel]:
    """Compile ``jobs`` (in ``workers`` forked processes when > 1: ptxas and LLVM are single-threaded)."""
    if workers <= 1 or len(jobs) < 2:
        results = []
        for i, job in enumerate(jobs):
            if progress:
                print(f"[{i + 1}/{len(jobs)}] {job.kernel} {job.mode} {job.config}", file=sys.stderr, flush=True)
            results.append(compile_job(job, arch))
        return results
    import multiprocessing

    _FORKED_JOBS[:] = jobs  # inherited by the forked workers; jobs hold JIT functions, which do not pickle
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_compile_forked, [(i, arch) for i in range(len(jobs))], chunksize=1)


def compile_all(dtype: torch.dtype | str = torch.bfloat16, dim: int | None = None, arch: int = 90,
                only: tuple[str, ...] | None = None, modes: Sequence[str] | None = None,
                progress: bool = False, workers: int = 1) -> list[CompiledKernel]:
    """Compile every kernel launch of the benchmark/training scenarios for ``cuda:sm_<arch>``.

    ``dtype`` picks the precision modes (bf16 -> bf16 and amp_bf16; fp32 -> fp32 and tf32; fp16; or a mode name),
    unless ``modes`` is given; ``dim`` restricts the recorded embedding widths; ``only`` keeps kernels whose name
    starts with one of the prefixes. Raises on any compile error (shared memory, dot shapes, ptxas).
    """
    if modes is None:
        name = dtype if isinstance(dtype, str) else {torch.bfloat16: "bf16", torch.float16: "fp16",
                                                     torch.float32: "fp32"}[dtype]
        modes = {"bf16": ("bf16", "amp_bf16"), "fp32": ("fp32", "tf32")}.get(name, (name,))
    jobs = record_jobs(scenarios(modes, dims=(dim,) if dim else DEFAULT_DIMS), arch)
    if only:
        jobs = [j for j in jobs if j.kernel.startswith(tuple(only))]
    return compile_jobs(jobs, arch, workers, progress)


def problems(results: Sequence[CompiledKernel]) -> list[str]:
    """What a GPU would reject or run badly: shared memory over sm_90's limit, spills, 16-bit dots off tensor cores."""
    out = []
    for r in results:
        tag = f"{r.name} [{r.dtype}] {r.config} ({r.scenario})"
        if r.shared_bytes > SM90_SHARED_LIMIT:
            out.append(f"{tag}: {r.shared_bytes} B shared memory > {SM90_SHARED_LIMIT}")
        if r.spills:
            out.append(f"{tag}: spills {r.spill_bytes} B ({r.registers} registers, stack {r.stack_bytes} B)")
        if r.uses_dot and set(r.dtype.split("+")) & {"bf16", "fp16", "amp_bf16", "tf32"} and not r.tensor_cores:
            out.append(f"{tag}: 16-bit or TF32 tl.dot without tensor-core instructions")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m vladva_openclip.kernels.aot``: compile all, print resources; exit 1 on any problem."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"any of {sorted(MODE_DTYPES)}")
    parser.add_argument("--dim", type=int, default=None, help="only this embedding width (default: all recorded)")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--only", default="", help="comma-separated kernel-name prefixes")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    args = parser.parse_args(argv)
    results = compile_all(dim=args.dim, arch=args.arch, modes=args.modes.split(","),
                          only=tuple(o for o in args.only.split(",") if o) or None, progress=True,
                          workers=args.workers)
    for r in results:
        print(f"{r.name:28s} {r.dtype:8s} {r.config:52s} regs={r.registers:3d} spill={r.spill_bytes:4d} "
              f"stack={r.stack_bytes:4d} shared={r.shared_bytes:6d} tc={'y' if r.tensor_cores else '-'} "
              f"({r.seconds:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    found = problems(results)
    for line in found:
        print("PROBLEM:", line)
    print(f"{len(results)} kernels compiled for sm_{args.arch}, {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
