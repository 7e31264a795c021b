"""Contrastive loss, forward + backward: fused ``contrastive_loss`` vs open_clip ``ClipLoss`` vs eager torch.

Providers (all get unit-norm features, logit_scale 100 with requires_grad, and return d image, d text, d scale):
* ``fused``: ``vladva_openclip.kernels.contrastive_loss`` with ``impl="auto"`` (Triton on CUDA, the chunked
  reference on CPU);
* ``clip_loss``: ``open_clip.loss.ClipLoss()`` (world_size 1), what open_clip_train would run;
* ``eager``: the textbook version: one ``logits = s * I @ T.T`` and ``(CE(logits) + CE(logits.T)) / 2``.

Run through ``benchmarks/bench_kernels.py``; ``--child`` runs one case in a fresh process (CPU memory).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks import _harness as H

PROVIDERS = ("fused", "clip_loss", "eager")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _eager(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def make_step(provider: str, n: int, d: int, dtype: torch.dtype, device: str):
    """Inputs and a closure running one forward+backward (gradients via autograd.grad: nothing accumulates)."""
    from open_clip.loss import ClipLoss
    from vladva_openclip.kernels import contrastive_loss

    gen = torch.Generator(device=device).manual_seed(0)
    img = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1).to(dtype).requires_grad_()
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    loss_fn = {"fused": contrastive_loss, "clip_loss": ClipLoss(), "eager": _eager}[provider]

    def step():
        loss = loss_fn(img, txt, scale)
        return torch.autograd.grad(loss, (img, txt, scale))

    return step


def measure_cuda(provider: str, n: int, d: int, dtype: str) -> dict:
    try:
        step = make_step(provider, n, d, DTYPES[dtype], "cuda")
        peak = H.cuda_peak_bytes(step)
        ms = H.time_ms(step, "cuda")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}
    return {"ms": ms, "peak_tensor": peak}


def child(provider: str, n: int, d: int, dtype: str, repeats: int) -> dict:
    """One CPU case in this (fresh) process: peak RSS of the first forward+backward, timing repeats, then the
    tensor-level peak (a separate run: the dispatch-mode tracker slows ops down)."""
    import time

    make_step(provider, 64, 32, DTYPES[dtype], "cpu")()  # warm-up at a tiny size: libraries, thread pools
    step = make_step(provider, n, d, DTYPES[dtype], "cpu")
    base = H.rss_bytes()
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
        if len(samples) == 1:
            peak_rss = H.max_rss_bytes() - base
    # one run: that run is the figure; more: the median of the runs after the first (page faults excluded)
    ms = samples[0] if len(samples) == 1 else sorted(samples[1:])[(len(samples) - 2) // 2]
    return {"ms": ms, "peak_rss": peak_rss, "peak_tensor": H.tensor_peak_bytes(step)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--provider", choices=PROVIDERS)
    parser.add_argument("--n", type=int)
    parser.add_argument("--d", type=int)
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.provider, args.n, args.d, args.dtype, args.repeats)))


if __name__ == "__main__":
    main()
