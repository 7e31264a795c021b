"""The ``hf`` caption backend on tiny random checkpoints in the real hub layouts (llava-hf/llava-1.5-7b-hf and
Qwen/Qwen2-VL-2B-Instruct files, real tokenizers and processor configs): its captions equal transformers' own
``generate`` on the processor's output, image by image, and a left-padded batch equals batch size 1."""
from __future__ import annotations

import pytest
import torch
from _helpers_layouts import (
    QWEN_PREPROCESSOR,
    needs_real_tokenizers,
    photo_like,
    qwen2vl_config_json,
    unpack_tokenizer,
    write_hub_checkpoint,
    write_llava_dir,
)

from vladva_openclip.caption import PRESETS, GenerationSettings
from vladva_openclip.caption.backends.hf import HFCaptioner

pytestmark = needs_real_tokenizers
INSTRUCTION = "Describe the image in one short sentence."
SETTINGS = GenerationSettings(max_new_tokens=12)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("caption_hf")
    # Qwen2-VL's 0.02 init gives a random model that answers every image with the same newlines; larger random
    # weights make its greedy output depend on the image (what the comparisons below need to mean something)
    qwen = root / "qwen2vl"
    write_hub_checkpoint({**qwen2vl_config_json(), "initializer_range": 0.5}, qwen, torch.bfloat16)
    unpack_tokenizer("qwen2-vl", qwen)
    (qwen / "preprocessor_config.json").write_text(json.dumps(QWEN_PREPROCESSOR))
    return {"llava": write_llava_dir(root / "llava"), "qwen2vl": qwen}


def _images(family: str):
    # LLaVA crops to 336: any size. Qwen2-VL keeps the size, so different sizes give prompts of different lengths
    sizes = [(336, 336), (280, 420), (448, 224)] if family == "llava" else [(56, 56), (112, 56), (84, 112)]
    return [photo_like(w, h, seed=i) for i, (w, h) in enumerate(sizes)]


def _reference(path, images, prompt: str) -> list[str]:
    """transformers alone: AutoProcessor on one image, AutoModelForImageTextToText.generate, greedy."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for image in images:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=SETTINGS.max_new_tokens, do_sample=False)
        out.append(processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_hf_backend_equals_transformers_generate_and_batch_equals_single(dirs, family):
    cap = HFCaptioner(str(dirs[family]), torch.device("cpu"), torch.float32)
    images = _images(family)
    prompt = cap.full_prompt(INSTRUCTION)
    if family == "llava":
        assert prompt == f"USER: <image>\n{INSTRUCTION} ASSISTANT:"
    else:
        assert "<|vision_start|><|image_pad|><|vision_end|>" + INSTRUCTION in prompt
    batched = cap.generate(images, INSTRUCTION, SETTINGS)
    single = [cap.generate([im], INSTRUCTION, SETTINGS)[0] for im in images]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_tokens for g in batched] == [g.n_tokens for g in single]
    assert [g.text for g in single] == _reference(dirs[family], images, prompt)
    assert all(g.text for g in batched) and len({g.text for g in batched}) > 1
    if family == "qwen2vl":  # the batch really was padded, on the left
        mask = cap.batch_inputs(images, INSTRUCTION)["attention_mask"]
        assert (mask == 0).any() and bool((mask[:, -1] == 1).all())


def test_hf_backend_job_writes_sidecar_with_counts(dirs, tmp_path):
    import pandas as pd

    from vladva_openclip.caption import CaptionJobConfig, run_caption

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(_images("qwen2vl")):
        im.save(folder / f"{i}.png")
    cap = HFCaptioner(str(dirs["qwen2vl"]), torch.device("cpu"), torch.float32)
    run_caption(CaptionJobConfig(str(folder), str(tmp_path / "out"), backend="hf", hf_model=str(dirs["qwen2vl"]),
                                 kind="short", long_generation=SETTINGS, short_generation=SETTINGS, workers=0,
                                 progress=False, batch_size=3), captioner=cap)
    df = pd.read_parquet(tmp_path / "out" / "sidecars" / "part-00000.captions.parquet")
    expected = cap.generate(_images("qwen2vl"), PRESETS["short"], SETTINGS)
    assert df["short_raw"].tolist() == [g.text for g in expected]
    assert df["short_generated_tokens"].tolist() == [g.n_tokens for g in expected]
    assert (df["short_generated_tokens"] <= SETTINGS.max_new_tokens).all()
    assert df["model"][0] == str(dirs["qwen2vl"])
