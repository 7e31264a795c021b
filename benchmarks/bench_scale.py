"""Training compute per step: padding saved by running the image + AR pass in caption-length groups, and the
FLOPs of a LLaVA-1.5-7B step (what the accumulation caching pass costs).

1. Tiny LLaVA on the synthetic world (the trainer's own data path: World scenes, the model's tokenizer, its
   ``max_long_len``), batches of 32: language-model tokens of the image + AR pass per step, one batch padded to
   its longest caption (before) against length groups (after, ``VladVA.ar_length_groups = 4``); and the CPU time
   of a forward + backward of the whole training loss, both ways (median of repeats, one process).
2. LLaVA-1.5-7B on the meta device (``vladva_openclip.plan.flops_per_step``, torch's FlopCounterMode over the
   real architecture): FLOPs per GPU of one optimizer step at batch 32 x accum 4 with gradient checkpointing and
   500-token captions, split into the gradient passes and the caching pass, plus the frozen vision tower's share
   (run once per micro-batch now that the gradient pass reuses the caching pass's output; twice before).

    python -m benchmarks.bench_scale            # prints JSON; figures go to BENCHMARKS.md by hand
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_tokens(batches: int = 8, batch: int = 32, repeats: int = 3) -> dict:
    import open_clip

    import vladva_openclip  # noqa: F401
    from vladva_openclip.loss import VladVALoss
    from vladva_openclip.model import length_groups
    from vladva_openclip.synth import World, WorldConfig
    from vladva_openclip.tokenizer import caption_lengths

    model, _, preprocess = open_clip.create_model_and_transforms("vladva-tiny-llava", precision="fp32")
    tok = open_clip.get_tokenizer("vladva-tiny-llava")
    world = World(WorldConfig(seed=0))
    t_img = len(model.image_input_ids())
    width = model.cfg.max_long_len
    before = after = caption_before = caption_after = real = 0
    data = []
    for b in range(batches):
        samples = [world.sample("train", b * batch + i) for i in range(batch)]
        long = tok.long_captions([s.long for s in samples], context_length=width)
        lengths = caption_lengths(long, tok.pad_token_id).tolist()
        groups = length_groups(lengths, t_img + 1, model.ar_length_groups)
        before += batch * (t_img + max(lengths) + 1)
        after += sum(len(g) * (t_img + max(lengths[i] for i in g) + 1) for g in groups)
        caption_before += batch * max(lengths)
        caption_after += sum(len(g) * max(lengths[i] for i in g) for g in groups)
        real += sum(lengths)
        if b < 2:
            images = torch.stack([preprocess(world.render(s.scene)) for s in samples])
            short = tok([s.short for s in samples], context_length=width)
            data.append((images, torch.stack([short, long], 1)))
    loss_fn = VladVALoss()
    model.train()

    def step(images, text):
        out = model(images, text)
        sum(loss_fn(**out, output_dict=True).values()).backward()
        model.zero_grad(set_to_none=True)

    times = {}
    for groups_setting in (1, 4):
        model.ar_length_groups = groups_setting
        step(*data[0])  # warm-up
        samples_ms = []
        for _ in range(repeats):
            for images, text in data:
                start = time.perf_counter()
                step(images, text)
                samples_ms.append((time.perf_counter() - start) * 1e3)
        times[groups_setting] = statistics.median(samples_ms)
    return {
        "batches": batches, "batch": batch, "image_part_tokens": t_img, "max_long_len": width,
        "llm_tokens_per_step_before": before / batches, "llm_tokens_per_step_after": after / batches,
        "token_ratio_after_over_before": round(after / before, 4),
        "caption_padding_before": round(1 - real / caption_before, 4),
        "caption_padding_after": round(1 - real / caption_after, 4),
        "step_ms_one_batch": round(times[1], 1), "step_ms_groups": round(times[4], 1),
        "time_ratio_groups_over_one_batch": round(times[4] / times[1], 3),
        "threads": torch.get_num_threads(),
    }


def flops_7b() -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from vladva_openclip.plan import PlanRequest, build_meta_model, flops_per_step

    request = PlanRequest(model="vladva-llava7b", batch_size=32, max_short_len=32, max_long_len=500,
                          precision="amp_bf16", grad_checkpointing=True, accum_freq=4)
    model = build_meta_model(request)
    flops = flops_per_step(model, request)
    size = model.cfg.image_size
    images = torch.empty(request.batch_size, 3, size, size, device="meta", dtype=model.base_dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.backbone.image_features(model.lvlm, images)
    vision = float(counter.get_total_flops()) * request.accum_freq  # per pass over the step's images
    before = flops["step"] + 2 * vision  # the frozen tower ran in the caching pass and again in the gradient pass
    step = flops["step"] + vision  # now its caching-pass output is reused (VladVA.reuse_vision_features)
    return {
        "step_tflops_before_vision_reuse": round(before / 1e12, 1),
        "setting": "LLaVA-1.5-7B, batch 32 x accum 4 per GPU, grad checkpointing, 500-token long / 32-token short "
                   "captions at full length",
        "step_tflops": round(step / 1e12, 1),
        "gradient_passes_tflops": round((flops["step"] - flops["caching_pass"]) / 1e12, 1),
        "caching_pass_llm_tflops": round(flops["caching_pass"] / 1e12, 1),
        "vision_tower_tflops_per_pass": round(vision / 1e12, 2),
        "caching_pass_share": round((flops["caching_pass"] + vision) / step, 4),
        "vision_tower_share_of_caching_pass": round(vision / (flops["caching_pass"] + vision), 4),
    }


def main() -> None:
    torch.manual_seed(0)
    print(json.dumps({"tiny": tiny_tokens(), "llava7b": flops_7b()}, indent=2))


if __name__ == "__main__":
    main()
