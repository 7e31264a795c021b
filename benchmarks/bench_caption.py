"""Throughput of `vladva caption`'s generation: batched (left-padded) against one image at a time.

CPU (default): the shipped tiny captioner (vladva-tiny-llava + synth_captioner) on synthetic-world scenes through
the ``vladva`` backend (transformers' ``generate`` under ``VladVA.generate_tokens``), greedy. The two runs'
captions are checked to be identical before any number is reported.

    python -m benchmarks.bench_caption                       # 32 scenes, 48 new tokens, batch 1 vs 16
    python -m benchmarks.bench_caption --images 64 --batch 32

GPU (prepared for a lent GPU; not run yet): LLaVA-1.5-7B geometry with random bf16 weights through the ``hf``
backend, batched vs batch 1, and through vLLM (``load_format="dummy"``) when it is installed. Random weights never
emit EOS, so every caption is exactly ``--new-tokens`` long. The decode bound printed beside it is
``batch x bandwidth / (weight bytes + batch x KV-cache bytes)`` tokens/s (H100 SXM: about 3.35 TB/s).

    python -m benchmarks.bench_caption --geometry llava7b --device cuda --images 64 --batch 32 --new-tokens 150
    python -m benchmarks.bench_caption --geometry tiny-hf --device cpu   # the same code path at toy size on CPU
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._harness import machine_name
from vladva_openclip.caption.config import GenerationSettings

BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, HBM datasheet figures


def _timed(captioner, inputs, instruction, settings, batch: int):
    """(seconds, generations) of captioning ``inputs`` ``batch`` at a time."""
    out = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, len(inputs), batch):
        out += captioner.generate(inputs[start:start + batch], instruction, settings)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _row(name: str, seconds: float, gens) -> dict:
    tokens = sum(g.n_tokens for g in gens)
    return {"run": name, "images": len(gens), "seconds": round(seconds, 3),
            "images_per_s": round(len(gens) / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "mean_tokens": round(tokens / len(gens), 1)}


def tiny_captioner(n: int):
    from vladva_openclip.caption.backends.vladva import VladVACaptioner
    from vladva_openclip.eval.api import ModelSpec, load_model
    from vladva_openclip.synth import World, WorldConfig

    model, preprocess, tokenizer = load_model(ModelSpec("vladva-tiny-llava", "synth_captioner"))
    cap = VladVACaptioner(model, preprocess, tokenizer)
    world = World(WorldConfig(seed=0))
    images = [cap.prepare(world.render(world.sample("test", i).scene)) for i in range(n)]
    return cap, images, "Describe the image in detail."


def hf_geometry(geometry: str, device: str, n: int, root: Path):
    """A random LLaVA-1.5 checkpoint directory (real tokenizer and processor configs; 7B geometry or toy) and a
    captioner on it. The 7B weights are made on the device in bf16, never written to disk."""
    import os
    import sys

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests"))
    import _helpers_layouts as layouts
    from _helpers_layouts import LLAVA_PREPROCESSOR, LLAVA_PROCESSOR, llava_config_json, photo_like, unpack_tokenizer

    # the real tokenizers: $VLADVA_TOKENIZERS, else shared/ beside or inside the checkout (the device machine's)
    candidates = [os.environ.get("VLADVA_TOKENIZERS"), repo.parent / "shared" / "data" / "tokenizers",
                  repo / "shared" / "data" / "tokenizers"]
    layouts.SHARED_TOKENIZERS = next((Path(c) for c in candidates if c and (Path(c) / "llava-1.5").is_dir()),
                                     layouts.SHARED_TOKENIZERS)
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vladva_openclip.caption.backends.hf import HFCaptioner

    if geometry == "llava7b":
        cfg = llava_config_json(hidden=4096, layers=32, vision_hidden=1024, vision_layers=24)
        cfg["text_config"].update(intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
        cfg["vision_config"].update(intermediate_size=4096, num_attention_heads=16, projection_dim=768)
    else:
        cfg = llava_config_json()
    path = root / geometry
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    unpack_tokenizer("llava-1.5", path)
    (path / "preprocessor_config.json").write_text(json.dumps(LLAVA_PREPROCESSOR))
    (path / "processor_config.json").write_text(json.dumps(LLAVA_PROCESSOR))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    conf = dict(cfg)
    hf_config = AutoConfig.for_model(conf.pop("model_type"), **conf)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(hf_config, dtype=dtype)
    cap = HFCaptioner(str(path), torch.device(device), dtype, model=model,
                      processor=AutoProcessor.from_pretrained(path))
    images = [photo_like(480, 360, seed=i) for i in range(n)]
    return cap, images, "Analyze the image in a comprehensive and detailed manner.", path, model


def decode_bound(model, batch: int, prompt_len: int, new_tokens: int) -> float | None:
    """Tokens/s a memory-bound decode cannot exceed: every step reads all weights once plus each row's KV cache
    (mean length prompt + new/2; LLaMA-2 has full multi-head attention)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    bw = next((v for k, v in BANDWIDTH.items() if k in name), None)
    if bw is None:
        return None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    t = model.config.get_text_config()
    kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * (t.hidden_size // t.num_attention_heads) * 2
    step_bytes = weights + batch * kv_per_token * (prompt_len + new_tokens / 2)
    return batch * bw / step_bytes


def vllm_row(path: Path, images, instruction, settings, batch: int) -> dict | None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        return None
    from vllm import LLM, SamplingParams

    from vladva_openclip.caption.backends.vllm import VLLMCaptioner, engine_kwargs

    engine = LLM(**engine_kwargs(str(path), "bf16", 1, {"load_format": "dummy", "max_model_len": 4096}))
    cap = VLLMCaptioner(str(path), engine, SamplingParams)
    cap.generate(images[:2], instruction, settings)  # warm-up (CUDA graphs, caches)
    seconds, gens = _timed(cap, images, instruction, settings, len(images))
    return _row(f"vllm (all {len(images)} at once)", seconds, gens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", default="tiny-captioner", choices=["tiny-captioner", "tiny-hf", "llava7b"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    model = path = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.geometry == "tiny-captioner":
            cap, images, instruction = tiny_captioner(args.images)
        else:
            cap, images, instruction, path, model = hf_geometry(args.geometry, args.device, args.images, Path(tmp))
        cap.generate(images[:2], instruction, settings)  # warm-up
        t1, single = _timed(cap, images, instruction, settings, 1)
        tb, batched = _timed(cap, images, instruction, settings, args.batch)
        same = [g.text for g in single] == [g.text for g in batched]
        rows = [_row("one image at a time", t1, single), _row(f"batched ({args.batch}, left-padded)", tb, batched)]
        if args.geometry == "llava7b":
            prompt_len = cap.batch_inputs(images[:1], instruction)["input_ids"].shape[1]
            bound = decode_bound(model, args.batch, prompt_len, args.new_tokens)
            if bound:
                rows[-1]["decode_bound_tokens_per_s"] = round(bound, 1)
            extra = vllm_row(path, images, instruction, settings, args.batch)
            if extra:
                rows.append(extra)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    print(f"machine: {machine_name(device)}; torch threads {torch.get_num_threads()}")
    print(f"geometry {args.geometry}, {args.images} images, {args.new_tokens} new tokens max, greedy; "
          f"batched captions identical to one-at-a-time: {same}")
    print("| run | images/s | tokens/s | mean tokens | s |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['images_per_s']} | {r['tokens_per_s']} | {r['mean_tokens']} | {r['seconds']} |")
    print(f"batched / one at a time: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x images/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "identical": same, "args": vars(args)}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
