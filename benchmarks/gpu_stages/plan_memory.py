"""Stage ``plan_memory``: ``vladva plan``'s total per GPU against the measured ``torch.cuda.max_memory_allocated``
of real training steps (forward, both losses, backward, AdamW step with its state) of real-width random-weight
models, with and without gradient checkpointing.

LLaVA-1.5-7B is built with 4 LLM decoder layers (full width, full vision tower); the plan is made on the meta
twin of exactly that build (same registered variant, same tokenizer). The peak is read on the second step (the
first creates AdamW's state). Dry run: the tiny LLaVA on CPU, where torch keeps no allocator statistics, so the
planned activation bytes are compared with autograd's saved tensors instead (what tests/test_plan.py checks).
"""
from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from benchmarks.gpu_stages import _common as C
from benchmarks.gpu_stages import models as M

_logger = logging.getLogger(__name__)

GPU_CASES = [  # (spec, batch, short, long, checkpointing)
    (M.ModelSpec("llava-1.5-7b", "vladva-llava7b", "asset:tiny-llava", 4, 32), 16, 32, 500, True),
    (M.ModelSpec("llava-1.5-7b", "vladva-llava7b", "asset:tiny-llava", 4, 32), 8, 32, 500, False),
    (M.ModelSpec("llava-1.5-7b", "vladva-llava7b", "asset:tiny-llava", 4, 32), 32, 32, 500, True),
]
DRY_CASES = [(M.ModelSpec("tiny-llava", "vladva-tiny-llava", "asset:tiny-llava", 2, 4), 2, 4, 12, False),
             (M.ModelSpec("tiny-llava", "vladva-tiny-llava", "asset:tiny-llava", 2, 4), 2, 4, 12, True)]
PRECISION = {"cuda": "amp_bf16", "cpu": "fp32"}
GiB = 2 ** 30


def planned(spec: M.ModelSpec, request_kw: dict[str, Any], precision: str):
    from vladva_openclip.factory import create_vladva
    from vladva_openclip.plan import PlanRequest, plan_model

    with M.registered_variant(spec.registered, spec.layers) as name:
        meta = create_vladva(name, precision=precision, device="meta", base_model=None, tokenizer=spec.tokenizer)
        return plan_model(meta, PlanRequest(model=name, precision=precision, **request_kw))


def measure(spec: M.ModelSpec, batch: int, short_len: int, long_len: int, checkpointing: bool,
            device: str) -> dict[str, Any]:
    from vladva_openclip.loss import VladVALoss
    from vladva_openclip.plan import SavedTensorCounter

    precision = PRECISION[device]
    row: dict[str, Any] = {"label": spec.label, "layers": spec.layers, "batch": batch, "long_len": long_len,
                           "grad_checkpointing": checkpointing, "precision": precision}
    plan = planned(spec, {"batch_size": batch, "max_short_len": short_len, "max_long_len": long_len,
                          "grad_checkpointing": checkpointing}, precision)
    row["planned_gib"] = round(plan.total_bytes / GiB, 3)
    row["planned_saved_gib"] = round((plan.saved_image_pass_bytes + plan.saved_text_pass_bytes
                                      + plan.ar_saved_bytes) / GiB, 4)
    model, info = M.build(spec, device, precision=precision)
    model.ar_length_groups = 1  # all captions have the same length: one group either way
    model.set_grad_checkpointing(checkpointing)
    model.train()
    loss_fn = VladVALoss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    images, text = M.random_batch(model, M.StepShape(batch=batch, short_len=short_len, long_len=long_len), device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "amp_bf16")

    def step() -> None:
        with autocast:
            out = model(image=images, text=text)
            loss = sum(loss_fn(**out, output_dict=True).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates AdamW's state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        row["measured_gib"] = round(measured / GiB, 3)
        row["planned_over_measured"] = round(plan.total_bytes / measured, 3)
    elif not checkpointing:
        counter = SavedTensorCounter(model)
        with counter.active():
            model(image=images, text=text)
        row["measured_saved_gib"] = round(counter.total / GiB, 4)
        row["planned_over_measured_saved"] = round(row["planned_saved_gib"] * GiB / counter.total, 3)
    row.update(parameters=info["parameters"], trainable=info["trainable"])
    return row


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    C.setup_logging()
    res = C.StageResult(args.result, args.deadline)
    device = "cpu" if args.dry_run else "cuda"
    for spec, batch, short_len, long_len, ckpt in (DRY_CASES if args.dry_run else GPU_CASES):
        if res.left() < 20:
            res.append("cases", {"label": spec.label, "batch": batch, "status": "skipped: out of time"})
            continue
        row = C.guarded(res, "cases", f"{spec.label} batch {batch} ckpt {ckpt}",
                        lambda case=(spec, batch, short_len, long_len, ckpt): measure(*case, device))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if row is not None:
            row["status"] = "ok"
            res.append("cases", row)
    res.finish()


if __name__ == "__main__":
    main()
