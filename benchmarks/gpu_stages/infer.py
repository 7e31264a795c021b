"""Stage ``infer``: ``encode_image`` / ``encode_text`` throughput of the shrunk LLaVA-1.5-7B (4 and 2 LLM layers,
extrapolated to 32 like the training step) and of open_clip's ViT-L-14-336 at random init, the CLIP reference, in
the same process. bf16 weights under bf16 autocast, ``torch.inference_mode``; times are ``do_bench`` medians.
Images: batch 64; texts: batch 256 (VladVA: 32-token captions; CLIP: its 77-token context)."""
from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch

from benchmarks.gpu_stages import _common as C
from benchmarks.gpu_stages import models as M

_logger = logging.getLogger(__name__)

GPU = {"images": 64, "texts": 256, "caption_len": 32, "clip": "ViT-L-14-336", "clip_kwargs": {}, "bf16": True}
# Dry run: a small open_clip ViT at 64 px and 16 text tokens stands in for ViT-L-14-336 (same code path), in fp32
# (CPUs without bf16 units run bf16 several times slower)
DRY = {"images": 2, "texts": 4, "caption_len": 6, "clip": "ViT-S-32",
       "clip_kwargs": {"force_image_size": 64, "force_context_length": 16}, "bf16": False}


def plan(dry_run: bool) -> list[M.ModelSpec]:
    if dry_run:
        return [M.ModelSpec("tiny-llava", "vladva-tiny-llava", "asset:tiny-llava", 2, 4),
                M.ModelSpec("tiny-llava", "vladva-tiny-llava", "asset:tiny-llava", 1, 4)]
    return [M.ModelSpec("llava-1.5-7b", "vladva-llava7b", "asset:tiny-llava", 4, 32),
            M.ModelSpec("llava-1.5-7b", "vladva-llava7b", "asset:tiny-llava", 2, 32)]


def time_ms(fn, device: str) -> float:
    from benchmarks import _harness as H

    return H.time_ms(fn, device, repeats=1 if device == "cpu" else 3)


def measure_vladva(spec: M.ModelSpec, sizes: dict[str, Any], device: str) -> dict[str, Any]:
    model, info = M.build(spec, device, precision="amp_bf16" if sizes["bf16"] else "fp32")
    model.eval()
    row: dict[str, Any] = {"label": spec.label, **info, "layers": info["llm_layers"], "image_batch": sizes["images"],
                           "text_batch": sizes["texts"], "caption_len": sizes["caption_len"]}
    gen = torch.Generator(device=device).manual_seed(0)
    size = model.cfg.image_size
    images = torch.randn(sizes["images"], 3, size, size, device=device, generator=gen)
    captions = M.random_captions(model, sizes["texts"], sizes["caption_len"], device)
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=sizes["bf16"]):
        recorder = M.LLMCallRecorder(model)
        model.encode_image(images)
        image_calls = list(recorder.calls)
        recorder.calls.clear()
        model.encode_text(captions)
        text_calls = list(recorder.calls)
        recorder.remove()
        image_ms = time_ms(lambda: model.encode_image(images), device)
        text_ms = time_ms(lambda: model.encode_text(captions), device)
    dims = M.llm_dims(model)
    vision = M.vision_forward_flops(model, device) * sizes["images"]
    row.update(image_ms=round(image_ms, 3), text_ms=round(text_ms, 3),
               images_per_s=C.sig(sizes["images"] / (image_ms / 1e3)),
               texts_per_s=C.sig(sizes["texts"] / (text_ms / 1e3)),
               image_tokens=image_calls[0][1] if image_calls else None,
               text_tokens=text_calls[0][1] if text_calls else None, dims=dims, image_calls=image_calls,
               text_calls=text_calls, vision_flops=vision,
               image_flops=vision + M.inference_flops(dims, image_calls, info["llm_layers"]),
               text_flops=M.inference_flops(dims, text_calls, info["llm_layers"]))
    return row


def extrapolate(rows: list[dict[str, Any]], full_layers: int) -> dict[str, Any] | None:
    measured = {r["layers"]: r for r in rows if "image_ms" in r}
    if len(measured) < 2:
        return None
    images = {k: r["image_ms"] for k, r in measured.items()}
    texts = {k: r["text_ms"] for k, r in measured.items()}
    if not (M.increasing(images) and M.increasing(texts)):
        return None  # timing noise made the deeper model look faster: no honest line through the points
    image_ms, text_ms = M.linear_fit(images, full_layers), M.linear_fit(texts, full_layers)
    deepest = measured[max(measured)]
    return {"label": deepest["label"], "layers": full_layers, "extrapolated": True,
            "method": f"linear fit of time over {sorted(measured)} layers", "image_batch": deepest["image_batch"],
            "text_batch": deepest["text_batch"], "image_ms": round(image_ms, 3),
            "text_ms": round(text_ms, 3), "images_per_s": C.sig(deepest["image_batch"] / (image_ms / 1e3)),
            "texts_per_s": C.sig(deepest["text_batch"] / (text_ms / 1e3))}


def measure_clip(name: str, sizes: dict[str, Any], device: str) -> dict[str, Any]:
    import open_clip

    start = time.time()
    with torch.device(device):  # no pretrained tag: random init, on the device
        model = open_clip.create_model(name, precision="bf16" if sizes["bf16"] else "fp32", device=device,
                                       **sizes["clip_kwargs"])
    model.eval()
    image_size = model.visual.image_size
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    context = int(getattr(model, "context_length", 77) or 77)
    vocab = int(getattr(model, "vocab_size", 49408) or 49408)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(sizes["images"], 3, image_size, image_size, device=device, generator=gen,
                         dtype=torch.bfloat16 if sizes["bf16"] else torch.float32)
    tokens = torch.randint(1, vocab - 1, (sizes["texts"], context), device=device, generator=gen)
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=sizes["bf16"]):
        image_ms = time_ms(lambda: model.encode_image(images), device)
        text_ms = time_ms(lambda: model.encode_text(tokens), device)
    toy = ", toy size" if sizes["clip_kwargs"] else ""
    row = {"label": f"open_clip {name} (random init{toy})", "image_batch": sizes["images"],
           "text_batch": sizes["texts"],
           "image_size": image_size, "text_tokens": context, "build_seconds": round(time.time() - start, 1),
           "image_ms": round(image_ms, 3), "text_ms": round(text_ms, 3),
           "images_per_s": C.sig(sizes["images"] / (image_ms / 1e3)),
           "texts_per_s": C.sig(sizes["texts"] / (text_ms / 1e3))}
    return row


def release(device: str) -> None:
    """Give back the memory of the model just measured (its last references died with the measuring call)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    C.setup_logging()
    res = C.StageResult(args.result, args.deadline)
    device = "cpu" if args.dry_run else "cuda"
    sizes = DRY if args.dry_run else GPU
    specs = plan(args.dry_run)
    # The CLIP reference is cheap and is the comparison this stage exists for: it goes between the two depths.
    first = C.guarded(res, "models", specs[0].label, lambda: measure_vladva(specs[0], sizes, device))
    release(device)
    if first:
        res.append("models", first)
    clip = C.guarded(res, "models", sizes["clip"], lambda: measure_clip(sizes["clip"], sizes, device))
    release(device)
    if clip:
        res.append("models", clip)
    for spec in specs[1:]:
        if first and res.left() < first["build_seconds"] + 10:
            res.append("models", {"label": spec.label, "layers": spec.layers, "status": "skipped: out of time"})
            continue
        row = C.guarded(res, "models", spec.label, lambda spec=spec: measure_vladva(spec, sizes, device))
        release(device)
        if row:
            res.append("models", row)
    vladva_rows = [r for r in res.data.get("models", []) if r.get("label") == specs[0].label]
    extra = extrapolate(vladva_rows, specs[0].full_layers)
    if extra:
        res.append("models", extra)
    res.finish()


if __name__ == "__main__":
    main()
