"""Base checkpoints in the real hub layouts, side by side with transformers' own processor and model.

The checkpoints (tests/_helpers_layouts.py) are tiny in width and depth but otherwise what llava-hf and Qwen
publish: legacy key names, sharded safetensors plus index, the real tokenizers, the real preprocessor configs and
the real vision geometry. The reference is ``LlavaForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration``
run on ``AutoProcessor(images=pil, text=full)``: its last-token, final-layer hidden state must equal
``encode_image(preprocess(pil))``, and ``encode_text`` must equal the same model on the plain tokenizer's ids.

Tolerances:
- with the processor's PIL backend the pixels are bit-identical to open_clip's preprocess (both resize with PIL
  bicubic, then crop, rescale and normalise in float32), so the embeddings agree to float32 round-off;
- transformers 5's default backend (torchvision) resizes uint8 tensors itself and rounds differently: up to
  2 levels of 8 bits on about 0.3-0.5% of the pixels (measured), which moves the embedding by ~1e-4 relative on these
  random models; the test allows 1e-3.
"""
import json
import re

import pytest
import torch
from _helpers_layouts import (
    build_side_by_side,
    llava_config_json,
    needs_real_tokenizers,
    photo_like,
    write_hub_checkpoint,
    write_llava_dir,
    write_qwen2vl_dir,
)

import vladva_openclip

pytestmark = needs_real_tokenizers

IMAGE_BODY = {"llava": "<image>", "qwen2vl": "<|vision_start|><|image_pad|><|vision_end|>"}
NAMES = {"llava": "vladva-llava7b", "qwen2vl": "vladva-qwen2vl2b"}
CAPTIONS = ["a red circle", "Two dogs play in the snow.", " leading and  double spaces ", "ends with newline\n",
            "naïve café, 東京", "looks like <image> or <pad> or <|im_end|>", ""]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_layouts")
    return {"llava": write_llava_dir(root / "llava-1.5-tiny"), "qwen2vl": write_qwen2vl_dir(root / "qwen2-vl-tiny")}


@pytest.fixture(scope="module")
def built(dirs):
    """family -> (VladVA model, preprocess_val, transformers reference model, AutoProcessor of the directory)."""
    return build_side_by_side(dirs, NAMES)


def _full(model, tower: str, body: str) -> str:
    template = model.cfg.template.image if tower == "image" else model.cfg.template.text
    prompt = model.cfg.image_prompt.text if tower == "image" else model.cfg.text_prompt.text
    return template.replace("{body}", body).replace("{prompt}", prompt)


def _ref_last_token(hf, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return hf.model(**inputs).last_hidden_state[:, -1].float()


def test_legacy_llava_keys_and_sharded_index_load_exactly(dirs, built):
    """Every tensor of the llava-hf-style shards lands, unchanged, where transformers 5 puts it (legacy names
    renamed), and the directory's config.json (not the registered 7B one) is the architecture."""
    from _helpers_layouts import legacy_key
    from safetensors.torch import load_file

    model = built["llava"][0]
    path = dirs["llava"]
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    files = {}
    for shard in sorted(set(index.values())):
        files.update(load_file(str(path / shard)))
    ours = {k.replace(".base_layer.", "."): v for k, v in model.lvlm.state_dict().items() if "lora_" not in k}
    assert len(files) == len(ours)
    for key, value in ours.items():
        assert torch.equal(files[legacy_key(key, "llava")].float(), value), key
    text = model.lvlm.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (64, 2, 32064)
    assert model.cfg.hf_config["text_config"]["hidden_size"] == 64 and model.cfg.image_size == 336
    assert model.image_body_ids.tolist().count(32000) == 576  # 336 px / patch 14, CLS dropped ("default")
    assert model.lvlm.config.vision_feature_layer == -2


def test_qwen2vl_layout_with_tied_embeddings(built):
    """The published Qwen2-VL-2B files hold no lm_head (tied): it must be the input embedding, not random."""
    model, _, hf, _ = built["qwen2vl"]
    lvlm = model.lvlm
    assert lvlm.lm_head.weight.data_ptr() == lvlm.get_input_embeddings().weight.data_ptr()
    assert torch.equal(lvlm.get_input_embeddings().weight, hf.get_input_embeddings().weight)
    assert lvlm.config.get_text_config().vocab_size == 151936 and lvlm.config.image_token_id == 151655


@pytest.mark.parametrize("backend, tol", [("pil", 1e-5), ("torchvision", 1e-3)])
@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_image_embedding_equals_transformers_on_processor_output(dirs, built, family, backend, tol):
    import copy

    from transformers import AutoImageProcessor

    model, preprocess, hf, processor = built[family]
    processor = copy.copy(processor)  # the directory's processor with the image processor of the backend
    processor.image_processor = AutoImageProcessor.from_pretrained(dirs[family], backend=backend)
    side = model.cfg.image_size
    # Qwen2-VL's processor keeps the image's own size (smart_resize): a side-by-side comparison needs an image the
    # processor does not resize, i.e. the model's square input size. LLaVA crops, so any aspect ratio compares.
    images = [photo_like(side, side, seed=1)] if family == "qwen2vl" else [photo_like(500, 400, 2),
                                                                           photo_like(333, 600, 3)]
    for pil in images:
        inputs = processor(images=pil, text=_full(model, "image", IMAGE_BODY[family]), return_tensors="pt")
        # the same ids (the processor expands the image placeholder), then the same states
        assert model.image_input_ids().tolist() == inputs["input_ids"][0].tolist()
        ref = _ref_last_token(hf, **inputs)
        with torch.no_grad():
            ours = model.encode_image(preprocess(pil).unsqueeze(0))
        rel = ((ours - ref).norm() / ref.norm()).item()
        assert rel <= tol, f"{family}/{backend} {pil.size}: relative difference {rel:.2e} > {tol:g}"


def _plain_text_ids(tokenizer, template: str, caption: str, prompt: str, add_bos: bool) -> list[int]:
    """``tokenizer(full)`` with the caption as plain text even where it looks like a special token.

    The whole string is cut only at the special tokens of the template itself; each text run between them (the
    one holding the caption included) is tokenized whole, which is what the tokenizer does with the full string.
    """
    pre, rest = template.split("{body}")
    post = rest.replace("{prompt}", prompt)
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len,
                      reverse=True)
    pattern = "(" + "|".join(re.escape(t) for t in specials) + ")"
    pre_parts, post_parts = re.split(pattern, pre), re.split(pattern, post)
    parts = [*pre_parts[:-1], pre_parts[-1] + caption + post_parts[0], *post_parts[1:]]
    ids = [tokenizer.bos_token_id] if add_bos else []
    for i, part in enumerate(parts):
        if i % 2:  # re.split puts the captured specials at odd positions
            ids.append(tokenizer.convert_tokens_to_ids(part))
        elif part:
            ids += tokenizer(part, add_special_tokens=False, split_special_tokens=True).input_ids
    return ids


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_text_embedding_equals_transformers_on_plain_tokenizer(built, family):
    model, _, hf, processor = built[family]
    plain = processor.tokenizer  # AutoTokenizer of the directory, as the processor loaded it
    tokenizer = model.tokenizer  # the caption tokenizer create_model built from the directory
    cfg = model.cfg
    for caption in CAPTIONS:
        ids = _plain_text_ids(plain, cfg.template.text, caption, cfg.text_prompt.text, cfg.template.add_bos)
        if "<" not in caption:  # nothing that looks like a special token: exactly the tokenizer on the full string
            assert ids == plain(_full(model, "text", caption), add_special_tokens=cfg.template.add_bos).input_ids
        ours_ids, mask = model.text_input_ids([caption])
        assert ours_ids[0][mask[0].bool()].tolist() == ids, caption
        ref = _ref_last_token(hf, input_ids=torch.tensor([ids]))
        with torch.no_grad():
            ours = model.encode_text(tokenizer([caption]))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5, msg=lambda m, c=caption: f"{c!r}: {m}")


def test_directory_config_is_the_architecture_on_meta_and_random(dirs, built):
    """Without loading weights too (meta device, load_weights=False), the directory's config.json decides."""
    import open_clip


    real = built["llava"][0]
    meta = open_clip.create_model("vladva-llava7b", base_model=str(dirs["llava"]), device="meta")
    assert vladva_openclip.count_parameters(meta) == vladva_openclip.count_parameters(real)
    rand = open_clip.create_model("vladva-llava7b", base_model=str(dirs["llava"]), load_weights=False)
    assert rand.embed_dim == 64 and rand.cfg.hf_config == real.cfg.hf_config
    assert not torch.equal(rand.embedding.weight, real.embedding.weight)


def test_other_sizes_in_the_directory(tmp_path):
    """A base of yet another size than the registered one and the fixture's (wider, deeper, 3 shards)."""
    import open_clip
    from _helpers_layouts import unpack_tokenizer

    path = write_hub_checkpoint(llava_config_json(hidden=96, layers=3, vision_layers=2), tmp_path / "b",
                                torch.float16, shards=3)
    unpack_tokenizer("llava-1.5", path)
    model = open_clip.create_model("vladva-llava7b", base_model=str(path))
    assert model.embed_dim == 96 and len(model.language_model.layers) == 3
    assert model.encode_image(torch.zeros(1, 3, 336, 336)).shape == (1, 96)


@pytest.mark.parametrize("name, family, other", [("vladva-llava7b", "qwen2vl", "vladva-qwen2vl2b"),
                                                 ("vladva-qwen2vl2b", "llava", "vladva-llava7b")])
def test_checkpoint_of_another_family_is_one_clear_error(dirs, name, family, other):
    import open_clip

    from vladva_openclip import BaseModelError

    for kwargs in ({}, {"device": "meta"}, {"load_weights": False}):
        with pytest.raises(BaseModelError) as info:
            open_clip.create_model(name, base_model=str(dirs[family]), **kwargs)
        msg = str(info.value)
        assert str(dirs[family]) in msg and other in msg and name in msg, msg


def test_qwen2vl_default_resize_mode_is_the_closest_to_its_processor(built):
    """Qwen2-VL's processor keeps the whole image at its aspect ratio; of open_clip's fixed-size modes the
    registered default must be the one whose embeddings are closest to transformers' on the processor's output
    (measured on real photographs of four aspect ratios; benchmarks/bench_qwen_preprocess.py has the figures)."""
    from _helpers_layouts import resize_mode_agreement, sample_photos

    model, _, hf, processor = built["qwen2vl"]
    scores = resize_mode_agreement(model, hf, processor, sample_photos()[:4])
    means = {mode: sum(v) / len(v) for mode, v in scores.items() if mode != "other_image"}
    assert model.cfg.resize_mode == max(means, key=means.get), means
    assert model.visual.preprocess_cfg["resize_mode"] == model.cfg.resize_mode
    # the margin is meaningful: larger than the gap between the default and the processor itself
    assert means[model.cfg.resize_mode] > scores["other_image"], (means, scores["other_image"])


def test_vladva_base_dir_supplies_weights_and_tokenizer(dirs, tmp_path, monkeypatch):
    """VLADVA_BASE_DIR/<last part of the hub id> stands in for the hub: weights, architecture and tokenizer."""
    import open_clip

    root = tmp_path / "bases"
    root.mkdir()
    (root / "llava-1.5-7b-hf").symlink_to(dirs["llava"], target_is_directory=True)
    monkeypatch.setenv("VLADVA_BASE_DIR", str(root))
    model = open_clip.create_model("vladva-llava7b")
    assert model.embed_dim == 64
    tokenizer = open_clip.get_tokenizer("vladva-llava7b")
    assert tokenizer.tokenizer.convert_tokens_to_ids("<image>") == 32000
