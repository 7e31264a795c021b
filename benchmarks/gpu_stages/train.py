"""Stage ``train``: one VladVA training step (contrastive + AR loss, LoRA + soft prompts, bf16 base under bf16
autocast as ``--precision amp_bf16``, gradient checkpointing, AdamW) of real-width random-weight models.

LLaVA-1.5-7B is built with 4 LLM decoder layers (the full CLIP ViT-L/14-336 vision tower and the 4096-wide LLM),
then with 2: the two step times give time = a + b * layers, extrapolated to the real 32 layers, and the FLOP count
(``models.FLOP_FORMULA``) turns that into samples/s and MFU. Qwen2-VL-2B follows at its full depth if the budget
allows. Batch: 32 images with a short caption of 32 tokens (contrastive) and a long caption of 500 tokens (AR).
"""
from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch

from benchmarks.gpu_stages import _common as C
from benchmarks.gpu_stages import models as M

_logger = logging.getLogger(__name__)

GPU_SHAPE = M.StepShape(batch=32, short_len=32, long_len=500)
DRY_SHAPE = M.StepShape(batch=2, short_len=4, long_len=12)
# bf16 base under bf16 autocast as open_clip_train's --precision amp_bf16; the dry run keeps fp32 (CPUs without
# bf16 units run it several times slower, and the dtype path is covered by tests/test_train.py)
PRECISION = {"cuda": "amp_bf16", "cpu": "fp32"}


def plan(dry_run: bool) -> list[M.ModelSpec]:
    """Models in the order they are measured (the 2-layer LLaVA only serves the extrapolation)."""
    if dry_run:
        return [M.ModelSpec("tiny-llava", "vladva-tiny-llava", "asset:tiny-llava", 2, 4),
                M.ModelSpec("tiny-llava", "vladva-tiny-llava", "asset:tiny-llava", 1, 4),
                M.ModelSpec("tiny-qwen2vl", "vladva-tiny-qwen2vl", "asset:tiny-qwen2vl", None, 2)]
    return [M.ModelSpec("llava-1.5-7b", "vladva-llava7b", "asset:tiny-llava", 4, 32),
            M.ModelSpec("llava-1.5-7b", "vladva-llava7b", "asset:tiny-llava", 2, 32),
            M.ModelSpec("qwen2-vl-2b", "vladva-qwen2vl2b", "asset:tiny-qwen2vl", None, 28)]


def peaks_from_context(context: dict[str, Any]) -> dict[str, float | None]:
    env = context.get("env", {})
    sheet = (env.get("device") or {}).get("datasheet") or {}
    return {"datasheet_tflops": sheet.get("bf16_tflops"),
            "measured_tflops": (env.get("measured") or {}).get("matmul_bf16_tflops")}


def utilisation(flops: float, seconds: float, peaks: dict[str, float | None]) -> dict[str, float | None]:
    achieved = flops / seconds / 1e12
    return {"tflops_per_s": C.sig(achieved),
            "mfu": round(achieved / peaks["datasheet_tflops"], 4) if peaks["datasheet_tflops"] else None,
            "mfu_vs_measured_matmul": (round(achieved / peaks["measured_tflops"], 4)
                                       if peaks["measured_tflops"] else None)}


def measure_model(spec: M.ModelSpec, shape: M.StepShape, device: str, repeats: int,
                  peaks: dict[str, float | None], count_flops: bool) -> dict[str, Any]:
    from vladva_openclip.loss import VladVALoss

    row: dict[str, Any] = {"label": spec.label, "batch": shape.batch, "short_len": shape.short_len,
                           "long_len": shape.long_len}
    model, info = M.build(spec, device, precision=PRECISION[device])
    row.update(info, precision=PRECISION[device])
    row["layers"] = info["llm_layers"]
    if device == "cuda":
        row["weights_gib"] = round(torch.cuda.memory_allocated() / 2 ** 30, 2)
    model.set_grad_checkpointing(True)
    model.train()
    loss_fn = VladVALoss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    images, text = M.random_batch(model, shape, device)
    last: dict[str, Any] = {}

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=PRECISION[device] == "amp_bf16"):
            out = model(image=images, text=text)
            losses = loss_fn(**out, output_dict=True)
            loss = sum(losses.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()
        last["ar_tokens"] = out["ar_num_tokens"].detach()

    recorder = M.LLMCallRecorder(model)
    step()  # warm-up (kernel selection, Triton compile, optimizer state); also records the LLM calls
    recorder.remove()
    calls = list(recorder.calls)
    row["llm_calls"] = calls
    row["loss"] = round(float(last["loss"]), 4)
    labelled = int(last["ar_tokens"].sum())
    dims = M.llm_dims(model)
    vision = M.vision_forward_flops(model, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    samples = C.wall_ms(step, device, repeats=repeats, warmup=0)
    ms = C.median(samples)
    row.update(step_ms=round(ms, 2), step_samples_ms=[round(s, 2) for s in samples],
               samples_per_s=C.sig(shape.batch / (ms / 1e3)))
    if device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    flops = M.step_flops(dims, calls, row["layers"], shape.batch, labelled, vision)
    row["flops"] = flops
    row["dims"] = dims
    row["labelled_tokens"] = labelled
    row.update(utilisation(flops["model"], ms / 1e3, peaks))
    row["hfu"] = utilisation(flops["hardware"], ms / 1e3, peaks)["mfu"]
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        try:
            with counter:
                step()
            row["counted_flops"] = float(counter.get_total_flops())
            row["counted_over_hardware"] = round(row["counted_flops"] / flops["hardware"], 3)
        except Exception as err:  # noqa: BLE001 - the cross-check is optional
            row["counted_flops_error"] = C.error_text(err)
    return row


def release(device: str) -> None:
    """Give back the memory of the model just measured (its last references died with the measuring call)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def extrapolate(rows: list[dict[str, Any]], label: str, full_layers: int,
                peaks: dict[str, float | None]) -> dict[str, Any] | None:
    """The step at ``full_layers`` LLM layers from the measured depths of ``label``."""
    measured = {r["layers"]: r for r in rows if r.get("label") == label and "step_ms" in r}
    if not measured:
        return None
    deepest = measured[max(measured)]
    if full_layers in measured:
        return None  # measured at full depth: nothing to extrapolate
    flops_full = M.step_flops(deepest["dims"], deepest["llm_calls"], full_layers, deepest["batch"],
                              deepest["labelled_tokens"], deepest["flops"]["vision"] / deepest["batch"])
    times = {k: r["step_ms"] for k, r in measured.items()}
    ms = M.linear_fit(times, full_layers)
    if ms is not None and M.increasing(times):
        method = f"linear fit of step time over {sorted(measured)} layers"
    else:  # one depth only, or timing noise made the deeper model look faster
        ms = deepest["step_ms"] * flops_full["model"] / deepest["flops"]["model"]
        method = f"FLOP-proportional from {deepest['layers']} layers (same MFU)"
    peak = None
    if all("peak_gib" in r for r in measured.values()):
        peak = M.linear_fit({k: r["peak_gib"] for k, r in measured.items()}, full_layers)
    out = {"label": label, "layers": full_layers, "extrapolated": True, "method": method,
           "batch": deepest["batch"], "step_ms": round(ms, 1), "samples_per_s": C.sig(deepest["batch"] / (ms / 1e3)),
           "peak_gib": round(peak, 1) if peak is not None else None, "flops": flops_full}
    out.update(utilisation(flops_full["model"], ms / 1e3, peaks))
    return out


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    C.setup_logging()
    res = C.StageResult(args.result, args.deadline)
    res.set("flop_formula", M.FLOP_FORMULA)
    peaks = peaks_from_context(C.read_context(args.context))
    device = "cpu" if args.dry_run else "cuda"
    shape = DRY_SHAPE if args.dry_run else GPU_SHAPE
    repeats = 1 if args.dry_run else 3
    specs = plan(args.dry_run)
    first_seconds = None
    for i, spec in enumerate(specs):
        # The first model's cost predicts the others'; the full-depth Qwen2-VL-2B costs about 1.5 times as much.
        need = 0 if first_seconds is None else first_seconds * (1.5 if spec.layers is None else 1.0)
        if res.left() < need:
            res.append("models", {"label": spec.label, "layers": spec.layers,
                                  "status": f"skipped: needs ~{need:.0f} s, {max(res.left(), 0):.0f} s left"})
            continue
        start = time.time()
        row = C.guarded(res, "models", f"{spec.label} ({spec.layers or 'full'} layers)",
                        lambda spec=spec, first=i == 0: measure_model(spec, shape, device, repeats, peaks,
                                                                      count_flops=first))
        release(device)
        if row is not None:
            row["status"] = "ok"
            row["seconds"] = round(time.time() - start, 1)
            res.append("models", row)
            first_seconds = first_seconds or row["seconds"]
        done = [r for r in res.data.get("models", []) if "step_ms" in r]
        res.set("extrapolated", [e for e in (extrapolate(done, s.label, s.full_layers, peaks)
                                             for s in {s.label: s for s in specs}.values()) if e])
    res.finish()


if __name__ == "__main__":
    main()
