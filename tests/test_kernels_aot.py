"""Ahead-of-time compile, for sm_90 (H100/H200) on this CPU-only machine, of exactly the kernels the benchmark and
training launch (kernels/aot.py): the real host code runs with launches recorded, each launch is bound as the JIT
binds it (alignment, divisibility, unit strides) and compiled for every autotune configuration it could pick.

Catches what the interpreter cannot: shared-memory overflow, dot-shape errors, register spills, 16-bit dots that
miss the tensor cores. Runs in subprocesses, because this test session has TRITON_INTERPRET=1, under which triton
cannot compile. triton's Linux wheels ship ptxas and cuobjdump, which these tests use; without triton the kernels
cannot run at all and the tests skip saying so, but a triton install without its ptxas/cuobjdump makes them fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from vladva_openclip.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(code: str, timeout: float = 900) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_ENV, timeout=timeout,
                         check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_COVERAGE = """
import json
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from vladva_openclip.kernels import aot, contrastive_triton, pooling_triton, similarity_triton
from benchmarks import bench_kernels

defined, tuned = set(), {}
for module in (contrastive_triton, pooling_triton, similarity_triton):
    for name, obj in vars(module).items():
        if name.endswith("_kernel") and isinstance(obj, (JITFunction, Autotuner)):
            defined.add(name)
            if isinstance(obj, Autotuner):
                tuned[name] = sorted(aot._config_name(c) for c in obj.configs)
jobs = aot.record_jobs(aot.scenarios())
print(json.dumps({
    "defined": sorted(defined), "tuned": tuned,
    "jobs": [[j.kernel, j.mode, j.config, j.scenario] for j in jobs],
    "aot_modes": list(aot.DEFAULT_MODES), "aot_dims": list(aot.DEFAULT_DIMS),
    "bench_modes": list(bench_kernels.GPU_MODES), "bench_dims": list(bench_kernels.GPU_DIMS),
}))
"""


def test_aot_covers_every_kernel_and_every_autotune_config():
    """A kernel nobody compiles, or an autotune configuration no recorded launch would try, fails this test (and so
    does a benchmark precision mode or width the AOT scenarios do not record)."""
    info = _run(_COVERAGE, timeout=300)
    compiled_kernels = {kernel for kernel, *_ in info["jobs"]}
    assert set(info["defined"]) == compiled_kernels, "kernels missing from the AOT check: " + \
        str(set(info["defined"]) - compiled_kernels)
    for kernel, configs in info["tuned"].items():
        seen = {config for k, _, config, _ in info["jobs"] if k == kernel}
        assert seen == set(configs), f"{kernel}: configs never compiled: {set(configs) - seen}"
    assert set(info["bench_modes"]) <= set(info["aot_modes"])
    assert set(info["bench_dims"]) <= set(info["aot_dims"])
    modes = {mode for _, joined, *_ in info["jobs"] for mode in joined.split("+")}
    assert modes == set(info["aot_modes"])


_COMPILE = """
import dataclasses, json, sys
from vladva_openclip.kernels import aot
modes = sys.argv[1].split(",")
results = aot.compile_all(modes=modes, dim=4096, workers=2)
out = {"rows": [dataclasses.asdict(r) for r in results], "problems": aot.problems(results)}
if "bf16" in modes:  # a configuration left out of the lists because it spills must be reported as spilling
    job = next(j for j in aot.record_jobs(aot.scenarios(("bf16",), ns=(2048,), dims=(4096,)))
               if j.kernel == "contrastive_grad_kernel")
    kwargs = {**job.kwargs, "BLOCK_N": 256, "num_warps": 4, "num_stages": 3}
    spilling = aot.compile_job(dataclasses.replace(job, kwargs=kwargs, config="BLOCK_N=256,warps=4,stages=3"))
    out["spilling"] = {"row": dataclasses.asdict(spilling), "problems": aot.problems([spilling])}
print(json.dumps(out))
"""


def _compile(modes: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _COMPILE, modes], capture_output=True, text=True, env=_ENV,
                         timeout=1800, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bf16_path_compiles_for_sm90_without_spills():
    """Training's dtypes (bf16 features, and fp32 features under bf16 autocast): every kernel and configuration fits
    shared memory, keeps its registers (no spill stores reported by ptxas) and runs its dots on tensor cores. The
    check reads real data: a configuration kept out of the lists because it spills is reported as spilling."""
    from vladva_openclip.kernels.aot import SM90_SHARED_LIMIT

    result = _compile("bf16,amp_bf16")
    rows = result["rows"]
    assert result["problems"] == [], "\n".join(result["problems"])
    names = {r["name"] for r in rows}
    assert {"contrastive_fwd_kernel", "contrastive_grad_kernel", "scaled_matmul_kernel", "similarity_fwd_kernel",
            "last_token_pool_fwd_kernel", "last_token_pool_bwd_kernel"} <= names
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] == 0 and r["shared_bytes"] <= SM90_SHARED_LIMIT, r
        if r["uses_dot"]:
            assert r["tensor_cores"], f"{r['name']} {r['config']}: the DOT_FP32 upcast reached the GPU build"
    # the JIT's specialisation reached the compiler: unit-stride 16-byte-aligned loads pipelined through shared
    # memory (cp.async) need the staged tiles' full size, which an unspecialised build does not allocate
    fwd = [r for r in rows if r["name"] == "contrastive_fwd_kernel" and "BLOCK_N=64," in r["config"]]
    assert fwd and all(r["shared_bytes"] >= 2 * (128 + 64) * 64 * 2 for r in fwd)
    spilling = result["spilling"]
    assert spilling["row"]["spill_bytes"] > 0 and spilling["row"]["registers"] == 255
    assert len(spilling["problems"]) == 1 and "spills" in spilling["problems"][0]


@pytest.mark.slow
def test_fp32_paths_compile_for_sm90_without_spills():
    """fp32 features: IEEE (FMA units) and TF32 (tensor cores) configurations."""
    result = _compile("fp32,tf32")
    assert result["problems"] == [], "\n".join(result["problems"])
    dots = [r for r in result["rows"] if r["uses_dot"]]
    assert all(r["tensor_cores"] == ("tf32" in r["dtype"].split("+")) for r in dots), "TF32: tensor cores; IEEE: FMA"


@pytest.mark.triton_interpret
def test_autotune_lists_for_sm90_and_one_config_under_the_interpreter():
    """sm_90 lists tune BLOCK_N over 64/128/256, 3-4 stages and 4/8 warps, keyed on D and the precision; the
    interpreter gets one fixed configuration (tuning would need a benchmarking driver); shared memory prunes fp32."""
    from _helpers_kernels import kernel_device

    kernel_device("interpret")
    from vladva_openclip.kernels import contrastive_triton as ct
    from vladva_openclip.kernels import similarity_triton as st
    from vladva_openclip.kernels._triton_common import SM90_SHARED_LIMIT, smem_estimate

    kernels = {"fwd": (ct.contrastive_fwd_kernel, ct.FWD_TILES), "grad": (ct.contrastive_grad_kernel, ct.GRAD_TILES),
               "matmul": (ct.scaled_matmul_kernel, ct.MATMUL_TILES), "similarity": (st.similarity_fwd_kernel,
                                                                                    st.SIM_TILES)}
    block_n, stages, warps = set(), set(), set()
    for name, (kernel, tiles) in kernels.items():
        assert len(kernel.configs) == 1 and kernel.configs[0] is tiles.interpret, name
        assert ("K" in tiles.key or "N" in tiles.key) and "PRECISION" in tiles.key, name
        for c in (*tiles.gpu, *tiles.tf32, *tiles.fma):
            block_n.add(c.kwargs["BLOCK_N"])
            stages.add(c.num_stages)
            warps.add(c.num_warps)
    assert block_n == {64, 128, 256} and stages == {3, 4} and warps == {4, 8}
    # fp32 operands take twice the shared memory: the largest 16-bit configuration does not fit them
    big = max(ct.MATMUL_TILES.gpu, key=lambda c: smem_estimate(ct.MATMUL_TILES, c, 2))
    assert smem_estimate(ct.MATMUL_TILES, big, 2) <= SM90_SHARED_LIMIT < smem_estimate(ct.MATMUL_TILES, big, 4)
