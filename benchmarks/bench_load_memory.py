"""Peak host memory of loading a real-width LLaVA-1.5-7B base through ``open_clip.create_model``.

The checkpoint is LLaVA-1.5-7B at full width with shrunk depth: the whole CLIP ViT-L/14-336 vision tower, the
projector, the real 32064-token vocabulary (embeddings and lm_head at 4096 wide) and 2 of the 32 decoder layers,
about 1.0e9 parameters. It is written the way llava-hf publishes it: legacy key names, safetensors shards of at most
1 GiB plus ``model.safetensors.index.json`` (once in bf16, once in fp16 as llava-hf's own files are), a llava-hf
style config.json, and the real tokenizer when ``../shared/data/tokenizers`` is present (else the tiny shipped one,
which changes nothing about the weights).

Each load runs in a fresh Python process that first imports everything and builds a tiny model (so lazily imported
modules are not counted), then reads its resident set size (the baseline), calls
``open_clip.create_model("vladva-llava7b", base_model=DIR, precision=P)``, and reports the OS high-water mark
(``ru_maxrss``) after reading every weight page, and, sampled every 2 ms, the peak of anonymous memory (``RssAnon``: private copies) and of
file-backed pages (``RssFile``: the memory-mapped safetensors, shared with the page cache and with other processes
mapping the same files, e.g. torchrun ranks). The goal compares the peak increase over the baseline with the
checkpoint's size: at most 1.3x, i.e. the weights are read straight into the requested dtype with no float32 copy
and no second full copy.

    python -m benchmarks.bench_load_memory              # writes both checkpoints to a temp dir and loads them
    python -m benchmarks.bench_load_memory --dir /data/llava7b-2l --keep --markdown
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import _harness as H

GOAL = 1.3
SHARD_BYTES = 1 << 30
DECODER_LAYERS = 2
SHARED_TOKENIZER = H.REPO.parent / "shared" / "data" / "tokenizers" / "llava-1.5"


# ---- the checkpoint ------------------------------------------------------------------------------------------
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# checkpoint dtype -> the precisions it is loaded in: its own dtype (the goal), and the other way a user may ask.
LOADS = {"bf16": ("bf16", "fp32"), "fp16": ("fp16", "bf16")}


def llava7b_config(dtype: str, layers: int = DECODER_LAYERS) -> dict:
    """vladva-llava7b's registered architecture with ``layers`` decoder layers, as a llava-hf config.json."""
    from vladva_openclip.registry import get_vladva_config

    cfg = get_vladva_config("vladva-llava7b")["vladva_cfg"]["hf_config"]
    cfg["text_config"]["num_hidden_layers"] = layers
    cfg["text_config"]["torch_dtype"] = DTYPES[dtype]
    return {"architectures": ["LlavaForConditionalGeneration"], **cfg, "torch_dtype": DTYPES[dtype],
            "vocab_size": cfg["text_config"]["vocab_size"], "tie_word_embeddings": False}


def legacy_key(key: str) -> str:
    """transformers-5 key -> llava-hf's published key."""
    for new, old in (("lm_head.", "language_model.lm_head."), ("model.language_model.", "language_model.model."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if key.startswith(new):
            return old + key[len(new):]
    return key


def write_checkpoint(dest: Path, dtype: str) -> int:
    """Write the checkpoint (``dtype``: bf16 or fp16) tensor by tensor, never more than one shard in memory;
    returns the weight bytes."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from vladva_openclip.backbones import get_backbone

    config = llava7b_config(dtype)
    tdtype = getattr(torch, DTYPES[dtype])
    with torch.device("meta"):
        meta = get_backbone("llava").build_random(config, tdtype)
    shapes = {legacy_key(k): tuple(v.shape) for k, v in meta.state_dict().items()}
    dest.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    names, weight_map = [], {}

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"  # renamed to -of-N once N is known
        save_file(shards[-1], str(dest / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shards[-1], name))
        shards[-1] = {}

    for key in sorted(shapes):
        t = torch.empty(shapes[key], dtype=tdtype).normal_(0, 0.02, generator=gen)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shards[-1][key] = t
        size += nbytes
        total += nbytes
    flush()
    final = {n: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, n in enumerate(names)}
    for old, new in final.items():
        (dest / old).rename(dest / new)
    weight_map = {k: final[v] for k, v in weight_map.items()}
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    if SHARED_TOKENIZER.is_dir():
        import gzip

        shutil.copy(SHARED_TOKENIZER / "tokenizer_config.json", dest / "tokenizer_config.json")
        with gzip.open(SHARED_TOKENIZER / "tokenizer.json.gz", "rb") as f:
            (dest / "tokenizer.json").write_bytes(f.read())
    return total


# ---- one load in a fresh process -----------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Sampler(threading.Thread):
    """Peak RssAnon / RssFile of this process, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.stop, self.anon, self.file = interval, threading.Event(), 0, 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.anon = max(self.anon, _status_kib("RssAnon"))
            self.file = max(self.file, _status_kib("RssFile"))
            time.sleep(self.interval)


def child(directory: str, precision: str) -> dict:
    import open_clip
    import torch

    import vladva_openclip  # noqa: F401

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    open_clip.create_model("vladva-tiny-llava")  # imports every lazily loaded module before the baseline
    tokenizer = {} if (Path(directory) / "tokenizer.json").is_file() else {"tokenizer": "asset:tiny-llava"}
    base = {"rss": H.rss_bytes(), "anon": _status_kib("RssAnon") * 1024, "file": _status_kib("RssFile") * 1024}
    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    model = open_clip.create_model("vladva-llava7b", base_model=directory, precision=precision, **tokenizer)
    seconds = time.perf_counter() - start
    peak_load = H.max_rss_bytes()
    # safetensors weights of the requested dtype stay memory-mapped until first used: read one element of every
    # 4 KiB page of every weight, so the figures below include the whole base resident, as in use.
    with torch.no_grad():
        for p in model.lvlm.parameters():
            flat = p.detach().reshape(-1)
            flat[:: max(1, 4096 // p.element_size())].float().sum()
    sampler.stop.set()
    sampler.join()
    weights = sum(p.numel() * p.element_size() for n, p in model.lvlm.named_parameters() if "lora_" not in n)
    return {"precision": precision, "dtype": str(model.base_dtype), "seconds": seconds, "baseline": base["rss"],
            "peak_load": peak_load, "peak_rss": H.max_rss_bytes(), "resident_rss": H.rss_bytes(),
            "peak_anon": sampler.anon * 1024 - base["anon"], "peak_file": sampler.file * 1024 - base["file"],
            "model_bytes": weights, "tokenizer": "real" if not tokenizer else "tiny stand-in"}


def run_load(directory: Path, precision: str, timeout: float = 1800) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_load_memory", "--child", str(directory), precision]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=H.REPO, env=env, check=False)
    if out.returncode != 0:
        return {"precision": precision, "error": (out.stderr or out.stdout).strip().splitlines()[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- report ----------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def markdown(rows: list[dict], machine: str) -> str:
    sizes = {r["checkpoint"]: r["checkpoint_bytes"] for r in rows}
    lines = [
        "## Loading a real-width LLaVA-1.5-7B base: peak host memory",
        "",
        ("Generated by `python -m benchmarks.bench_load_memory --markdown`. Checkpoint: LLaVA-1.5-7B at full width "
         f"with {DECODER_LAYERS} of its 32 decoder layers (full CLIP ViT-L/14-336 tower, projector, 32064 x 4096 "
         "embeddings and lm_head), written as llava-hf publishes it (legacy key names, shards <= 1 GiB + index), "
         "once in bf16 and once in fp16 (llava-hf's own files are fp16): "
         + ", ".join(f"{k} **{_gib(v)} GiB**" for k, v in sizes.items()) + " of weights. "
         "Each load runs `open_clip.create_model(\"vladva-llava7b\", base_model=DIR, precision=P)` in a fresh "
         "process; the baseline is its RSS after the imports and a tiny warm-up model. Weights loaded in the "
         "checkpoint's own dtype stay memory-mapped until first used, so after `create_model` returns one element "
         "of every 4 KiB page of every weight is read: *peak increase* (`ru_maxrss` - baseline) then covers the "
         "whole base resident, as in use. *anon* / *file* = sampled peaks of private (`RssAnon`) and memory-mapped "
         "file (`RssFile`: page cache, shared with other processes mapping the same shards, e.g. torchrun ranks) "
         f"pages above the baseline. Goal: a peak increase of at most {GOAL}x the checkpoint size when the base "
         "is loaded in the checkpoint's dtype (bf16 -> bf16)."),
        "",
        f"Machine: `{machine}` (shared with other jobs: the times are noisy, the memory figures are not).",
        "",
        ("| checkpoint | precision | base dtype | create_model s | peak during create_model GiB | peak increase, "
         "weights resident GiB | increase / checkpoint | anon GiB | file GiB | goal |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['checkpoint']} | {r['precision']} "
        if "error" in r:
            lines.append(head + f"| error: {r['error']} | | | | | | | |")
            continue
        inc = r["peak_rss"] - r["baseline"]
        ratio = inc / r["checkpoint_bytes"]
        own = r["precision"] == r["checkpoint"]
        goal = ("met" if ratio <= GOAL else "not met") if own and r["checkpoint"] == "bf16" else "(info)"
        lines.append(head + f"| {r['dtype'].replace('torch.', '')} | {r['seconds']:.1f} "
                     f"| {_gib(r['peak_load'] - r['baseline'])} | {_gib(inc)} | {ratio:.2f}x "
                     f"| {_gib(r['peak_anon'])} | {_gib(r['peak_file'])} | {goal} |")
    lines += ["", ("Loads in another dtype than the checkpoint's (bf16 -> fp32, fp16 -> bf16) convert every tensor: "
                   "the converted base is private memory next to the pages read from the files, so their peak is the "
                   "converted size plus the file pages. bf16 -> fp32 shows what a float32 copy at any point of a bf16 "
                   "load would cost. The file pages are clean page cache, which the kernel drops under memory "
                   "pressure and shares between processes; the memory a load commits is the *anon* column: about "
                   "1.0x the checkpoint for fp16 -> bf16 (the real llava-hf files with `precision=\"amp_bf16\"`), "
                   "almost nothing for a load in the checkpoint's own dtype. With a CUDA device the weights go from "
                   "the mapped files to the GPU (`device_map`), so each torchrun rank commits no host copy; not "
                   "measured here (no GPU).")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=2, metavar=("DIR", "PRECISION"), help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help="where to write (or find) the checkpoints (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint directories")
    p.add_argument("--checkpoints", default="bf16,fp16", help="checkpoint dtypes to write and load (%(default)s)")
    p.add_argument("--markdown", action="store_true", help="replace the section in BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    root = args.dir or Path(tempfile.mkdtemp(prefix="llava7b-2l-"))
    rows = []
    try:
        for ckpt_dtype in args.checkpoints.split(","):
            path = root / ckpt_dtype
            if not (path / "model.safetensors.index.json").is_file():
                start = time.perf_counter()
                write_checkpoint(path, ckpt_dtype)
                print(f"wrote {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            size = sum(f.stat().st_size for f in path.glob("model-*.safetensors"))
            for precision in LOADS[ckpt_dtype]:
                rows.append({"checkpoint": ckpt_dtype, "checkpoint_bytes": size, **run_load(path, precision)})
    finally:
        if not args.keep and args.dir is None:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    text = markdown(rows, H.machine_name("cpu"))
    print(text)
    print(json.dumps(rows))
    if args.markdown:
        H.replace_section(H.REPO / "BENCHMARKS.md", "load-memory", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
