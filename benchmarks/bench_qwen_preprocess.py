"""Which preprocessing brings Qwen-VL embeddings (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) closest to the processor's own.

Each family's processor keeps the whole image at its own aspect ratio and (bounded) resolution; a batch of open_clip
tensors is square. For each of open_clip's modes (``shortest``: resize the short side and crop; ``longest``:
resize the long side and pad, aspect ratio kept; ``squash``: resize both sides) this compares
``encode_image(preprocess(pil))`` with the final-layer last-token state of transformers' own model run
on ``AutoProcessor(images=pil, text=full)``, on real photographs of four aspect ratios (scikit-learn's two sample
images, rotated and cropped): mean cosine similarity, and for scale the mean cosine between the processor's
embeddings of *different* photos.

The dynamic-resolution path is measured beside them: ``NativeTransform`` (the processor's smart_resize) under the
square size's pixel budget and at the processor's own band, images of different sizes in one ``encode_image`` call.

Without ``--base-model`` the model is random, in each family's real geometry (patch 14 or 16, merge 2, temporal
patch 2, Qwen2.5-VL's attention windows, Qwen3-VL's DeepStack, the real tokenizer and preprocessor config) at small
widths, over several seeds and sizes. Random weights measure how much of
the image's content reaches the embedding, not semantics; with real weights available, pass
``--base-model /path/to/Qwen2-VL-2B-Instruct`` to measure the real thing.

    python -m benchmarks.bench_qwen_preprocess [--markdown]
    python -m benchmarks.bench_qwen_preprocess --base-model /data/Qwen2-VL-2B-Instruct
    python -m benchmarks.bench_qwen_preprocess --base-model /data/Qwen3-VL-2B-Instruct --family qwen3vl
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import _harness as H

# The real-layout checkpoint writer and the measurement are shared with tests/test_real_layouts.py.
sys.path.insert(0, str(H.REPO / "tests"))

MODES = ("shortest", "longest", "squash")
NATIVE = ("native", "native (processor band)")  # one size per image: NativeTransform at budget S^2 / processor band
# (seed, LLM hidden size, LLM layers, vision depth, vision width) of the random real-geometry models
RANDOM_MODELS = [(0, 64, 2, 2, 32), (1, 64, 2, 2, 32), (2, 128, 4, 4, 64)]
# family -> (registered model, transformers class, geometry in words)
FAMILIES = {
    "qwen2vl": ("vladva-qwen2vl2b", "Qwen2VLForConditionalGeneration", "patch 14, merge 2, 448 px"),
    "qwen25vl": ("vladva-qwen25vl3b", "Qwen2_5_VLForConditionalGeneration",
                 "patch 14, merge 2, 112-px attention windows, 448 px"),
    "qwen3vl": ("vladva-qwen3vl2b", "Qwen3VLForConditionalGeneration", "patch 16, merge 2, DeepStack, 512 px"),
}


def random_checkpoint(family: str, root: Path, seed: int, hidden: int, layers: int, depth: int, width: int) -> Path:
    import json as _json

    import torch
    from _helpers_layouts import QWEN_PREPROCESSOR, qwen2vl_config_json, unpack_tokenizer, write_hub_checkpoint
    from _helpers_qwen_layouts import (
        QWEN3_PREPROCESSOR,
        QWEN25_PREPROCESSOR,
        qwen3vl_config_json,
        qwen25vl_config_json,
    )

    if family == "qwen3vl":
        config = qwen3vl_config_json(hidden=hidden, layers=max(layers, depth), depth=depth)
        config["vision_config"].update(hidden_size=width, intermediate_size=2 * width, num_heads=max(2, width // 16))
        text, vocab, pre = config["text_config"], "qwen3", QWEN3_PREPROCESSOR
    else:
        maker = qwen2vl_config_json if family == "qwen2vl" else qwen25vl_config_json
        config = maker(hidden=hidden, layers=layers)
        vision = {"depth": depth, "num_heads": max(2, width // 16)}
        vision.update({"embed_dim": width} if family == "qwen2vl" else
                      {"hidden_size": width, "intermediate_size": 2 * width, "fullatt_block_indexes": [depth - 1]})
        config["vision_config"].update(vision)
        text, vocab = config, "qwen2-vl"
        pre = QWEN_PREPROCESSOR if family == "qwen2vl" else QWEN25_PREPROCESSOR
    head_half = hidden // text["num_attention_heads"] // 2 if family != "qwen3vl" else text["head_dim"] // 2
    rope = text["rope_scaling"]
    rope["mrope_section"] = [head_half // 4, (head_half - head_half // 4) // 2,
                             head_half - head_half // 4 - (head_half - head_half // 4) // 2]
    path = write_hub_checkpoint(config, root / f"{family}-{seed}-{hidden}x{layers}", torch.bfloat16, seed=seed)
    unpack_tokenizer(vocab, path)
    (path / "preprocessor_config.json").write_text(_json.dumps(pre))
    return path


def native_agreement(model, hf, processor, images) -> dict:
    """Cosine of ``encode_image([NativeTransform(...)(pil) ...])`` (one size per image, one call) with the
    processor's reference, at the square input's pixel budget and at the processor's own band."""
    import torch
    import torch.nn.functional as F

    from vladva_openclip.transforms import NativeTransform

    body = "<|vision_start|><|image_pad|><|vision_end|>"
    full = model.cfg.template.image.replace("{body}", body).replace("{prompt}", model.cfg.image_prompt.text)
    with torch.no_grad():
        refs = torch.stack([hf.model(**processor(images=im, text=full, return_tensors="pt")).last_hidden_state[0, -1]
                            .float() for im in images])
        out = {}
        for mode, budget in zip(NATIVE, (None, "processor")):
            transform = NativeTransform(model, max_pixels=budget)
            ours = model.encode_image([transform(im) for im in images])
            out[mode] = F.cosine_similarity(ours, refs, dim=-1).tolist()
    return out


def measure(base_model: Path, family: str = "qwen2vl") -> dict:
    import open_clip
    import torch
    from _helpers_layouts import resize_mode_agreement, sample_photos
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vladva_openclip  # noqa: F401

    model = open_clip.create_model(FAMILIES[family][0], base_model=str(base_model)).eval()
    hf = AutoModelForImageTextToText.from_pretrained(base_model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(base_model)
    photos = sample_photos()
    scores = resize_mode_agreement(model, hf, processor, photos, MODES)
    scores.update(native_agreement(model, hf, processor, photos))
    return {"model": base_model.name, "family": family, "image_size": model.cfg.image_size,
            "default": model.cfg.resize_mode, "sizes": [list(p.size) for p in photos], **scores}


def markdown(rows: list[dict], machine: str, real: bool) -> str:
    what = ("real weights" if real else "random weights in each family's real geometry (real tokenizer and "
            "preprocessor config), small widths, 3 seeds/sizes")
    cols = (*MODES, *NATIVE)
    lines = [
        "## Qwen-VL families: which preprocessing is closest to the processor",
        "",
        ("Generated by `python -m benchmarks.bench_qwen_preprocess --markdown`. Cosine similarity between "
         "`encode_image(...)` and the final-layer last-token state of transformers' own model "
         "(`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`) "
         "on `AutoProcessor(images=pil, text=full)` (the whole image at its aspect ratio and resolution), mean over 8 "
         "real photographs (scikit-learn's two sample images, as is, rotated, cropped to 2:1 and to 0.59:1). "
         "*shortest / longest / squash*: open_clip's fixed-size modes at the registered square size; *native*: "
         "`NativeTransform` (the processor's smart_resize) under the square size's pixel budget, one size per image "
         "in one `encode_image` call; *native (processor band)*: the same at the processor's own pixel band. "
         f"*other image*: mean cosine between the processor's embeddings of different photographs. Model: {what}."),
        "",
        f"Machine: `{machine}`.",
        "",
        "| family | model | " + " | ".join(cols) + " | other image | closest fixed-size |",
        "|---|---|" + "---|" * (len(cols) + 2),
    ]
    for r in rows:
        means = {m: sum(r[m]) / len(r[m]) for m in cols if m in r}
        best = max(MODES, key=means.get)
        lines.append(f"| {r.get('family', 'qwen2vl')} | {r['model']} | "
                     + " | ".join(f"{means[m]:.4f}" if m in means else "-" for m in cols)
                     + f" | {r['other_image']:.4f} | {best} |")
    lines += ["", ("Squash keeps the whole image, as the processor does, and fills every image token with content; "
                   "shortest crops the sides off (half of a 2:1 photograph); longest keeps the aspect ratio but "
                   "a third to a half of the tokens are padding the processor never shows. The registered "
                   "default of every Qwen family is the closest fixed-size mode, by a small margin over shortest for "
                   "Qwen3-VL, whose learned position grid is resampled to each image's grid: a square grid differs "
                   "more from the processor's. The native path is closer than any fixed size in every row, at the "
                   "fixed-size path's token count (budget S^2, aspect ratio kept); at the processor's band it is "
                   "the processor (cosine 1 up to float rounding: same pixels, same sequence). Random weights cannot tell whether "
                   "a trained model minds the aspect distortion of squash; rerun with `--base-model` on real "
                   "weights to check.")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", type=Path, help="a real Qwen-VL directory (default: random tiny checkpoints)")
    p.add_argument("--family", choices=sorted(FAMILIES), action="append",
                   help="families to measure (repeatable; default all; with --base-model: the one it holds)")
    p.add_argument("--markdown", action="store_true", help="replace the section in BENCHMARKS.md")
    args = p.parse_args(argv)
    families = args.family or (["qwen2vl"] if args.base_model else list(FAMILIES))
    if args.base_model:
        rows = [measure(args.base_model, families[0])]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [measure(random_checkpoint(f, Path(tmp), *spec), f) for f in families for spec in RANDOM_MODELS]
    text = markdown(rows, H.machine_name("cpu"), real=bool(args.base_model))
    print(text)
    print(json.dumps(rows))
    if args.markdown:
        H.replace_section(H.REPO / "BENCHMARKS.md", "qwen-preprocess", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
