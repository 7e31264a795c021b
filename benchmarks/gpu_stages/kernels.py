"""Stage ``kernels``: the fused contrastive loss against open_clip's ClipLoss (forward + backward, time and peak
memory, in this one process) and the last-token pooling kernel's bandwidth.

Measurements come from the kernel benchmarks' own functions (``benchmarks/bench_contrastive.py``,
``bench_pooling.py``, ``_harness.py``: ``triton.testing.do_bench`` median and ``torch.cuda.max_memory_allocated``
above the inputs), so these figures and ``python -m benchmarks.bench_kernels --device cuda`` agree. Cases run in
order of value (bf16 at the goal sizes first, fp32 and N = 65536 last) and a case whose estimated time does not fit
in what is left of the stage is recorded as skipped instead of being started.
"""
from __future__ import annotations

import logging
import time

from benchmarks.gpu_stages import _common as C

_logger = logging.getLogger(__name__)

PROVIDERS = ("fused", "clip_loss")
GPU_NS = (4096, 8192, 32768, 65536)
GPU_DS = (1024, 4096)
# products of N x N x D per forward+backward (kernels/README.md: fused 4 with the one-pass backward, ClipLoss 6) and what fraction of the
# measured matrix rate each is assumed to reach when estimating whether a case fits (pessimistic)
PRODUCTS = {"fused": 4, "clip_loss": 6}
ASSUMED_EFFICIENCY = 0.25
DO_BENCH_CALLS = 12  # warm-up, peak-memory call, do_bench (1 + 5 estimate + warm-up + >= 1 timed), check
CHECK_MAX_N = 32768  # the reference check (an fp32 rerun) above this N costs more than it tells


def loss_cases(dry_run: bool) -> list[tuple[int, int, str]]:
    """(N, D, dtype) in the order they are measured."""
    if dry_run:
        return [(64, 32, "fp32"), (128, 48, "bf16")]
    grid = [(n, d) for n in GPU_NS for d in GPU_DS]
    order = [(n, d, "bf16") for n, d in grid if n <= 32768]
    order += [(n, d, "bf16") for n, d in grid if n > 32768]
    order += [(n, d, "fp32") for n, d in grid if n <= 8192]
    order += [(n, d, "fp32") for n, d in grid if n > 8192]
    return order


def estimate_seconds(provider: str, n: int, d: int, dtype: str, rates: dict[str, float | None]) -> float:
    """Pessimistic wall time of measuring one case (``rates``: measured TFLOP/s per dtype from stage env)."""
    rate = rates.get(dtype) or (300.0 if dtype == "bf16" else 20.0)
    step = PRODUCTS[provider] * 2.0 * n * n * d / (rate * 1e12 * ASSUMED_EFFICIENCY)
    return DO_BENCH_CALLS * step + 1.0


def fused_impl(n: int, d: int, dtype: str, device: str) -> str:
    """Which implementation ``contrastive_loss(impl="auto")`` picks for these inputs (and why not Triton)."""
    import torch
    from vladva_openclip.kernels import not_supported_reasons

    from benchmarks import bench_contrastive as BC

    x = torch.empty(2, d, device=device, dtype=BC.DTYPES[dtype])
    scale = torch.tensor(1.0, device=device)
    reasons = not_supported_reasons("contrastive_loss", "triton", x, x, scale, None, None)
    if device == "cpu":
        reasons = reasons or ["auto runs the reference on CPU tensors"]
    return "triton" if not reasons else "reference (" + "; ".join(reasons) + ")"


def measure_loss_case(provider: str, n: int, d: int, dtype: str, device: str) -> dict:
    from benchmarks import _harness as H
    from benchmarks import bench_contrastive as BC

    if device == "cuda":
        # also checks the gradients against the fp32 reference (bench_contrastive.check) up to CHECK_MAX_N
        return BC.measure_cuda(provider, n, d, dtype, run_check=n <= CHECK_MAX_N)
    # Dry run: the same step on CPU (the fused provider takes the reference path there), tensor-level peak.
    step = BC.make_step(provider, n, d, BC.DTYPES[dtype], "cpu")
    ms = H.time_ms(step, "cpu", repeats=1)
    return {"ms": ms, "peak_tensor": H.tensor_peak_bytes(step)}


def interpreter_smoke() -> dict:
    """Dry run only: the Triton kernels themselves under TRITON_INTERPRET=1, against ClipLoss and the reference."""
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss
    from vladva_openclip.kernels import contrastive_loss, last_token_pool

    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(40, 24, generator=gen), dim=1)
    txt = F.normalize(torch.randn(40, 24, generator=gen), dim=1)
    scale = torch.tensor(20.0)
    fused = contrastive_loss(img, txt, scale, impl="triton")
    ref = ClipLoss()(img, txt, scale)
    hidden = torch.randn(3, 5, 24, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    pooled = last_token_pool(hidden, mask, impl="triton")
    pooled_ref = last_token_pool(hidden, mask, impl="reference")
    return {"loss_abs_diff": abs(float(fused) - float(ref)),
            "pool_max_abs_diff": float((pooled - pooled_ref).abs().max())}


def run_loss(res: C.StageResult, device: str, cases: list[tuple[int, int, str]], rates: dict[str, float | None],
             stop_at: float) -> None:
    """Measure ``cases`` (N, D, dtype) for every provider; appends one row per (case, provider) to ``loss``."""
    impls: dict[tuple[int, str], str] = {}
    for n, d, dtype in cases:
        for provider in PROVIDERS:
            row = {"n": n, "d": d, "dtype": dtype, "provider": provider}
            if provider == "fused":
                if (d, dtype) not in impls:
                    try:
                        impls[(d, dtype)] = fused_impl(n, d, dtype, device)
                    except Exception as err:  # noqa: BLE001 - the label is informative; the measurement matters
                        impls[(d, dtype)] = f"unknown ({C.error_text(err)})"
                row["impl"] = impls[(d, dtype)]
            need = estimate_seconds(provider, n, d, dtype, rates) if device == "cuda" else 1.0
            if stop_at - time.time() < need:
                row["status"] = f"skipped: needs ~{need:.0f} s, {max(stop_at - time.time(), 0):.0f} s left"
                res.append("loss", row)
                continue
            start = time.time()
            try:
                out = measure_loss_case(provider, n, d, dtype, device)
            except Exception as err:  # noqa: BLE001 - record and go on to the next case
                out = {"error": C.error_text(err)}
            if device == "cuda":
                import torch

                torch.cuda.empty_cache()
            row["seconds"] = round(time.time() - start, 2)
            if "error" in out:
                row["status"] = out["error"]
            else:
                row.update(status="ok", ms=C.sig(out["ms"]), peak_mib=C.sig(out["peak_tensor"] / 2 ** 20))
                # what ran and how it compares with the reference, where the benchmark reports it
                row.update({k: out[k] for k in ("impl", "check", "grad_max_rel", "grad_rms_rel", "loss_rel")
                            if k in out})
            _logger.info("loss %s", row)
            res.append("loss", row)


def run_pooling(res: C.StageResult, device: str, dry_run: bool, measured: dict, datasheet: dict | None) -> None:
    import torch

    from benchmarks import bench_pooling as BP

    shapes = [(8, 5, 32), (4, 7, 48)] if dry_run else BP.GPU_SHAPES
    dtype = torch.float32 if dry_run else torch.bfloat16
    # Dry run: impl="triton" runs the kernel under the interpreter (auto would take the reference on CPU).
    impls = ["triton"] if dry_run else ["triton", "reference"]
    hbm = (datasheet or {}).get("hbm_gbps")
    copy = measured.get("copy_gbps")
    for b, t, d in shapes:
        for impl in impls:
            row = {"b": b, "t": t, "d": d, "dtype": str(dtype).split(".")[-1], "impl": impl}
            try:
                out = BP.measure((b, t, d), dtype, device, impl)
                row.update(status="ok", ms=C.sig(out["ms"]), gbps=C.sig(out["gbps"]))
                if hbm:
                    row["pct_hbm_peak"] = round(100 * out["gbps"] / hbm, 1)
                if copy:
                    row["pct_copy"] = round(100 * out["gbps"] / copy, 1)
            except Exception as err:  # noqa: BLE001
                row["status"] = C.error_text(err)
            if device == "cuda":
                torch.cuda.empty_cache()
            _logger.info("pooling %s", row)
            res.append("pooling", row)


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    C.setup_logging()
    res = C.StageResult(args.result, args.deadline)
    context = C.read_context(args.context)
    env = context.get("env", {})
    measured = env.get("measured", {})
    datasheet = (env.get("device") or {}).get("datasheet")
    device = "cpu" if args.dry_run else "cuda"
    rates = {"bf16": measured.get("matmul_bf16_tflops"), "fp32": measured.get("matmul_fp32_tflops")}
    if args.dry_run:
        C.guarded(res, "errors", "interpreter smoke", lambda: res.set("interpreter_smoke", interpreter_smoke()))
    # Pooling is cheap and carries a goal: measure it before the long N = 65536 / fp32 loss cases.
    grid = loss_cases(args.dry_run)
    first = [c for c in grid if c[2] == "bf16" and c[0] <= 32768]
    rest = [c for c in grid if c not in first]
    run_loss(res, device, first, rates, res.deadline - 2.0)
    run_pooling(res, device, args.dry_run, measured, datasheet)
    run_loss(res, device, rest, rates, res.deadline - 2.0)
    res.finish()


if __name__ == "__main__":
    main()
