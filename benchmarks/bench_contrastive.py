"""Contrastive loss, forward + backward: fused ``contrastive_loss`` vs open_clip ``ClipLoss`` vs eager torch.

Providers (all get unit-norm features, logit_scale 100 with requires_grad, and return d image, d text, d scale):
* ``fused``: ``vladva_openclip.kernels.contrastive_loss`` with ``impl="auto"`` (Triton on CUDA, the chunked
  reference on CPU);
* ``clip_loss``: ``open_clip.loss.ClipLoss()`` (world_size 1), what open_clip_train would run;
* ``eager``: the textbook version: one ``logits = s * I @ T.T`` and ``(CE(logits) + CE(logits.T)) / 2``.

Modes (``vladva_openclip.kernels.precision``): ``fp32`` (IEEE), ``tf32`` (fp32 features, TF32 allowed: what
open_clip_train enables), ``bf16`` / ``fp16`` features, ``amp_bf16`` (fp32 features inside
``torch.autocast(dtype=torch.bfloat16)``, as open_clip_train runs ClipLoss with ``--precision amp_bf16``). Every
provider runs in the same mode.

Each case records which implementation ran (``implementation``) and checks its loss and gradients against the fp32
reference on the same input values in the same process (``check``). Run through ``benchmarks/bench_kernels.py``;
``--child`` runs one case in a fresh process (CPU memory).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks import _harness as H

PROVIDERS = ("fused", "clip_loss", "eager")
MODES = ("fp32", "tf32", "bf16", "fp16", "amp_bf16")
_DTYPE_MODES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _mode(mode_or_dtype: str | torch.dtype) -> str:
    """Mode name; a torch dtype (the pre-mode API of make_step) names its plain mode."""
    return _DTYPE_MODES[mode_or_dtype] if isinstance(mode_or_dtype, torch.dtype) else mode_or_dtype


def __getattr__(name: str):
    if name == "DTYPES":  # mode -> feature dtype (kept for callers of the pre-mode API, e.g. benchmarks/gpu_stages)
        from vladva_openclip.kernels.precision import MODE_DTYPES

        return MODE_DTYPES
    raise AttributeError(name)
#: tolerance of the check, as (max relative error, RMS relative error) of the gradients against the fp32 reference:
#: fp32 as the CPU tests; TF32 rounds the operands to 10 mantissa bits; 16-bit modes round operands and G (tests'
#: bf16/fp16 tolerances). ClipLoss in 16-bit modes also rounds the logits, and may miss them: that is the finding.
CHECK_TOL = {"fp32": (5e-5, 2e-5), "tf32": (1e-2, 3e-3), "bf16": (2e-2, 6e-3), "amp_bf16": (2e-2, 6e-3),
             "fp16": (4e-3, 1e-3)}
CPU_CHECK_MAX_N = 8192  # the check reruns the reference: on CPU only where that takes seconds, not minutes


def _eager(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def make_inputs(n: int, d: int, mode: str, device: str, seed: int = 0):
    """(image, text, logit_scale), leaves requiring grad; features in the mode's dtype."""
    from vladva_openclip.kernels.precision import MODE_DTYPES

    dtype = MODE_DTYPES[mode]
    gen = torch.Generator(device=device).manual_seed(seed)
    img = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1)
    txt = F.normalize(torch.randn(n, d, device=device, generator=gen) + 0.3 * img, dim=1)
    return (img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_(),
            torch.tensor(100.0, device=device, requires_grad=True))


def _loss_fn(provider: str):
    from open_clip.loss import ClipLoss
    from vladva_openclip.kernels import contrastive_loss

    return {"fused": contrastive_loss, "clip_loss": ClipLoss(), "eager": _eager}[provider]


def make_case(provider: str, n: int, d: int, mode: str | torch.dtype, device: str):
    """Inputs and a closure running one forward+backward in ``mode`` (gradients via autograd.grad: nothing
    accumulates). -> (step, inputs); ``step()`` returns (loss, d image, d text, d scale)."""
    from vladva_openclip.kernels.precision import mode_context

    mode = _mode(mode)
    inputs = make_inputs(n, d, mode, device)
    loss_fn = _loss_fn(provider)

    def step():
        with mode_context(mode, device):
            loss = loss_fn(*inputs)
        return (loss, *torch.autograd.grad(loss, inputs))

    return step, inputs


def make_step(provider: str, n: int, d: int, mode: str | torch.dtype, device: str):
    """The closure of :func:`make_case` alone (its inputs live in it)."""
    return make_case(provider, n, d, mode, device)[0]


def implementation(provider: str, mode: str, inputs) -> str:
    """What ran: the dispatcher's choice, the compute dtype and precision, and the autotuner's picks on GPU."""
    from vladva_openclip.kernels.contrastive import CONTRASTIVE_LOSS, compute_dtype
    from vladva_openclip.kernels.precision import cuda_matmul_allows_tf32, mode_context

    img, txt, scale = inputs
    with mode_context(mode, img.device.type):
        operands = compute_dtype(img)
        tf32 = operands == torch.float32 and cuda_matmul_allows_tf32()
    numerics = f"{str(operands).split('.')[-1]} operands{' (TF32)' if tf32 else ''}, fp32 accumulation"
    if provider == "fused":
        name = CONTRASTIVE_LOSS.select("auto", img, txt, scale, None, None).name
        text = f"{name}: {numerics}"
        if name == "triton":
            text += "; " + autotuned_configs()
        return text
    if provider == "clip_loss":
        return f"open_clip ClipLoss (torch matmul): {numerics}, logits in {str(operands).split('.')[-1]}"
    return f"torch: {numerics}"


def autotuned_configs() -> str:
    """The configuration each autotuned contrastive kernel settled on (after a run)."""
    from vladva_openclip.kernels import contrastive_triton as ct

    parts = []
    for kernel in (ct.contrastive_fwd_kernel, ct.contrastive_grad_kernel, ct.scaled_matmul_kernel):
        best = getattr(kernel, "best_config", None)
        if best is not None:
            meta = ",".join(f"{k}={v}" for k, v in sorted(best.kwargs.items()))
            parts.append(f"{kernel.fn.__name__.removesuffix('_kernel')}[{meta},w{best.num_warps},s{best.num_stages}]")
    return " ".join(parts) or "no autotuned launch recorded"


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.detach().double(), b.detach().double()
    err = a - b
    scale, rms = b.abs().max().item(), b.pow(2).mean().sqrt().item()
    return (err.abs().max().item() / scale if scale else 0.0), (err.pow(2).mean().sqrt().item() / rms if rms else 0.0)


def check(provider: str, mode: str, outputs, inputs) -> dict:
    """The provider's loss and gradients against ``contrastive_loss(impl="reference")`` in IEEE fp32 on the same
    input values (16-bit modes: the 16-bit values). -> {"check": "ok"|"over tolerance", errors...}."""
    from vladva_openclip.kernels import contrastive_loss
    from vladva_openclip.kernels.precision import MODE_DTYPES, fp32_matmul

    img, txt, scale = inputs
    rounded = MODE_DTYPES["bf16"] if mode == "amp_bf16" else img.dtype  # autocast computes from bf16 values
    ref_in = [t.detach().to(rounded).float().requires_grad_() for t in (img, txt)]
    ref_scale = scale.detach().clone().requires_grad_()
    with fp32_matmul(False):
        ref_loss = contrastive_loss(*ref_in, ref_scale, impl="reference")
        ref = (ref_loss, *torch.autograd.grad(ref_loss, (*ref_in, ref_scale)))
    loss, d_img, d_txt, d_scale = outputs
    grads = [_rel(g.float(), r) for g, r in ((d_img, ref[1]), (d_txt, ref[2]))]
    max_rel, rms_rel = max(g[0] for g in grads), max(g[1] for g in grads)
    loss_rel = abs(loss.item() - ref[0].item()) / max(abs(ref[0].item()), 1e-12)
    scale_rel = abs(d_scale.item() - ref[3].item()) / max(abs(ref[3].item()), 1e-12)
    tol = CHECK_TOL[mode]
    ok = max_rel <= tol[0] and rms_rel <= tol[1] and loss_rel <= 1e-3 and scale_rel <= 1e-2
    return {"check": "ok" if ok else "over tolerance", "grad_max_rel": max_rel, "grad_rms_rel": rms_rel,
            "loss_rel": loss_rel, "dscale_rel": scale_rel}


def measure_cuda(provider: str, n: int, d: int, mode: str | torch.dtype, run_check: bool = True) -> dict:
    """One CUDA case: time, peak memory above the inputs, what ran, and (``run_check``) the reference check."""
    mode = _mode(mode)
    try:
        step, inputs = make_case(provider, n, d, mode, "cuda")
        step()  # warm-up: autotuning and lazy initialisation stay out of the time and the peak
        peak = H.cuda_peak_bytes(step)
        ms = H.time_ms(step, "cuda")
        result = {"ms": ms, "peak_tensor": peak, "impl": implementation(provider, mode, inputs)}
        if run_check:
            result.update(check(provider, mode, step(), inputs))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}
    return result


def child(provider: str, n: int, d: int, mode: str, repeats: int) -> dict:
    """One CPU case in this (fresh) process: peak RSS of the first forward+backward, timing repeats, then the
    tensor-level peak (a separate run: the dispatch-mode tracker slows ops down), then the check."""
    import time

    make_step(provider, 64, 32, mode, "cpu")()  # warm-up at a tiny size: libraries, thread pools
    step, inputs = make_case(provider, n, d, mode, "cpu")
    base = H.rss_bytes()
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        outputs = step()
        samples.append((time.perf_counter() - start) * 1e3)
        if len(samples) == 1:
            peak_rss = H.max_rss_bytes() - base
    # one run: that run is the figure; more: the median of the runs after the first (page faults excluded)
    ms = samples[0] if len(samples) == 1 else sorted(samples[1:])[(len(samples) - 2) // 2]
    result = {"ms": ms, "peak_rss": peak_rss, "peak_tensor": H.tensor_peak_bytes(step),
              "impl": implementation(provider, mode, inputs)}
    impl_is_reference = provider == "fused" and result["impl"].startswith("reference")
    if impl_is_reference:
        result["check"] = "is the reference"
    elif n <= CPU_CHECK_MAX_N:
        result.update(check(provider, mode, outputs, inputs))
    else:
        result["check"] = f"not checked (N > {CPU_CHECK_MAX_N} on CPU)"
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--provider", choices=PROVIDERS)
    parser.add_argument("--n", type=int)
    parser.add_argument("--d", type=int)
    parser.add_argument("--dtype", default="fp32", choices=MODES, help="precision mode (fp32, tf32, bf16, ...)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.provider, args.n, args.d, args.dtype, args.repeats)))


if __name__ == "__main__":
    main()
