"""Qwen2.5-VL and Qwen3-VL side by side with transformers' own processor and model, in the real hub layouts.

The checkpoints (tests/_helpers_qwen_layouts.py) are tiny in width and depth but otherwise what Qwen publishes:
the config.json layout, key names, tied embeddings, bfloat16 shards plus index, the real vocabularies
(``qwen2-vl/`` for Qwen2.5-VL, ``qwen3/`` for Qwen3-VL) and preprocessor configs, the real vision geometry
(patch 14 / 16, merge 2, temporal patch 2; Qwen2.5-VL's 112-px attention windows; Qwen3-VL's DeepStack). The
reference is ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` run on
``AutoProcessor(images=pil, text=full)``: its last-token final-layer state must equal ``encode_image``, for the
model's square input size and for other sizes (dynamic resolution: the processor keeps an image whose sides are
multiples of the patch unit and whose pixel count is in its band, so both see the same pixels).
"""
import pytest
import torch
from _helpers_layouts import build_side_by_side, needs_real_tokenizers, photo_like
from _helpers_qwen_layouts import write_qwen3vl_dir, write_qwen25vl_dir
from test_real_layouts import CAPTIONS, _plain_text_ids

import vladva_openclip

pytestmark = needs_real_tokenizers

BODY = "<|vision_start|><|image_pad|><|vision_end|>"
NAMES = {"qwen25vl": "vladva-qwen25vl3b", "qwen3vl": "vladva-qwen3vl2b"}
# (height, width) beside the square input size: non-square, and one a quarter of the tokens
OTHER_SIZES = {"qwen25vl": [(224, 336), (392, 168)], "qwen3vl": [(256, 384), (416, 224)]}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_layouts")
    return {"qwen25vl": write_qwen25vl_dir(root / "qwen2.5-vl-tiny"), "qwen3vl": write_qwen3vl_dir(root / "qwen3-vl-tiny")}


@pytest.fixture(scope="module")
def built(dirs):
    """family -> (VladVA model, preprocess_val, transformers reference model, AutoProcessor of the directory)."""
    return build_side_by_side(dirs, NAMES)


def _full(model, tower: str, body: str, prompt: str | None = None) -> str:
    template = model.cfg.template.image if tower == "image" else model.cfg.template.text
    if prompt is None:
        prompt = model.cfg.image_prompt.text if tower == "image" else model.cfg.text_prompt.text
    return template.replace("{body}", body).replace("{prompt}", prompt)


def _reference(hf, processor, model, pil) -> tuple[list[int], torch.Tensor]:
    inputs = processor(images=pil, text=_full(model, "image", BODY), return_tensors="pt")
    with torch.no_grad():
        return inputs["input_ids"][0].tolist(), hf.model(**inputs).last_hidden_state[:, -1].float()


def _native(model, pil) -> torch.Tensor:
    """``[3, H, W]``: the image at its own size, normalised (what the processor does to an image it keeps)."""
    import torchvision.transforms.functional as TF

    return TF.normalize(TF.to_tensor(pil), model.cfg.image_mean, model.cfg.image_std)


@pytest.mark.parametrize("name, expected", [
    ("vladva-qwen25vl3b", 3.75e9), ("vladva-qwen25vl7b", 8.29e9), ("vladva-qwen25vl32b", 33.5e9),
    ("vladva-qwen25vl72b", 73.4e9), ("vladva-qwen3vl2b", 2.13e9), ("vladva-qwen3vl4b", 4.44e9),
    ("vladva-qwen3vl8b", 8.77e9)])
def test_real_architectures_on_meta_have_published_sizes(name, expected):
    """The registered configs are the published architectures: parameter counts of the model cards (hub
    safetensors totals), to 0.5 %."""
    import open_clip

    model = open_clip.create_model(name, device="meta")
    counts = vladva_openclip.count_parameters(model)
    assert abs(counts["base"] - expected) / expected < 0.005, counts
    assert counts["lora"] > 0


@pytest.mark.parametrize("family", ["qwen25vl", "qwen3vl"])
def test_layout_loads_with_tied_embeddings_and_the_directory_architecture(dirs, built, family):
    """The published files hold no lm_head (tied): it must be the input embedding, not random; the directory's
    config.json (tiny) replaces the registered architecture."""
    model, _, hf, _ = built[family]
    lvlm = model.lvlm
    assert type(lvlm).__name__ == model.backbone.model_class_name
    assert lvlm.lm_head.weight.data_ptr() == lvlm.get_input_embeddings().weight.data_ptr()
    assert torch.equal(lvlm.get_input_embeddings().weight, hf.get_input_embeddings().weight)
    assert model.embed_dim == 64 and lvlm.config.get_text_config().vocab_size == 151936
    ours = {k.replace(".base_layer.", "."): v for k, v in lvlm.state_dict().items() if "lora_" not in k}
    for key, value in hf.state_dict().items():
        assert torch.equal(ours[key].float(), value), key


@pytest.mark.parametrize("family", ["qwen25vl", "qwen3vl"])
def test_image_embedding_equals_transformers_on_processor_output(built, family):
    """The square input size through open_clip's preprocess, then other sizes at their own resolution: the same
    ids as the processor's expansion, the same last-token state as transformers' model."""
    model, preprocess, hf, processor = built[family]
    side = model.cfg.image_size
    pil = photo_like(side, side, seed=1)
    ids, ref = _reference(hf, processor, model, pil)
    assert model.image_input_ids().tolist() == ids
    with torch.no_grad():
        ours = model.encode_image(preprocess(pil).unsqueeze(0))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    for h, w in OTHER_SIZES[family]:
        pil = photo_like(w, h, seed=h)
        ids, ref = _reference(hf, processor, model, pil)
        assert model.image_input_ids((h, w)).tolist() == ids, (h, w)
        assert ids.count(model.backbone.image_token_id(model.lvlm.config)) == model.backbone.num_image_tokens(
            model.lvlm.config, (h, w))
        with torch.no_grad():
            ours = model.encode_image(_native(model, pil).unsqueeze(0))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4, msg=lambda m, s=(h, w): f"{s}: {m}")


@pytest.mark.parametrize("family", ["qwen25vl", "qwen3vl"])
def test_an_items_embedding_does_not_depend_on_its_batch(built, family):
    """Images of different sizes in one call (a list): each row is right padded and equals the image alone,
    whatever else is in the batch and in whichever order."""
    model, _, _, _ = built[family]
    side = model.cfg.image_size
    sizes = [(side, side), *OTHER_SIZES[family]]
    images = [_native(model, photo_like(w, h, seed=i)) for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        alone = torch.cat([model.encode_image(im.unsqueeze(0)) for im in images])
        mixed = model.encode_image(images)
        reordered = model.encode_image(images[::-1]).flip(0)
        twice = model.encode_image([images[1], images[1], images[0]])
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reordered, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(twice, alone[[1, 1, 0]], atol=1e-5, rtol=1e-4)
    # and the sizes give different sequences (the test is not vacuous)
    assert len({len(model.image_input_ids(s)) for s in sizes}) == len(sizes)
    # the AR pass over [image | caption | EOS] rows of different image lengths: each row as alone
    tok = model.tokenizer
    caps = tok.long_captions(["a red circle", "two dogs play in the snow", "x"], context_length=12)
    with torch.no_grad():
        feats, nll, count = model.image_features_and_ar(images, caps)
        for i, im in enumerate(images):
            f1, n1, c1 = model.image_features_and_ar(im.unsqueeze(0), caps[i:i + 1])
            torch.testing.assert_close(feats[i:i + 1], f1, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(nll[i:i + 1], n1, atol=1e-4, rtol=1e-4)
            assert count[i] == c1[0]
    torch.testing.assert_close(feats, torch.nn.functional.normalize(alone, dim=-1), atol=1e-5, rtol=1e-4)


def test_deepstack_features_reach_the_llm(built):
    """Qwen3-VL's embedding needs the DeepStack injection: without it the state is far from transformers'."""
    model, preprocess, hf, processor = built["qwen3vl"]
    side = model.cfg.image_size
    pil = photo_like(side, side, seed=4)
    _, ref = _reference(hf, processor, model, pil)
    backbone = model.backbone
    try:
        backbone.injection_kwargs = lambda layer_tokens, slots: {}
        with torch.no_grad():
            without = model.encode_image(preprocess(pil).unsqueeze(0))
    finally:
        del backbone.injection_kwargs  # the class's method again
    assert ((without - ref).norm() / ref.norm()) > 1e-2


@pytest.mark.parametrize("family", ["qwen25vl", "qwen3vl"])
def test_text_embedding_equals_transformers_on_plain_tokenizer(built, family):
    model, _, hf, processor = built[family]
    plain, tokenizer, cfg = processor.tokenizer, model.tokenizer, model.cfg
    for caption in CAPTIONS:
        ids = _plain_text_ids(plain, cfg.template.text, caption, cfg.text_prompt.text, cfg.template.add_bos)
        if "<" not in caption:
            assert ids == plain(_full(model, "text", caption), add_special_tokens=cfg.template.add_bos).input_ids
        ours_ids, mask = model.text_input_ids([caption])
        assert ours_ids[0][mask[0].bool()].tolist() == ids, caption
        with torch.no_grad():
            ref = hf.model(input_ids=torch.tensor([ids])).last_hidden_state[:, -1].float()
            ours = model.encode_text(tokenizer([caption]))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4, msg=lambda m, c=caption: f"{c!r}: {m}")


@pytest.mark.parametrize("family", ["qwen25vl", "qwen3vl"])
def test_generate_equals_transformers_generate(built, family):
    """The captioning path (adapters at their zero init) gives transformers' own greedy tokens for the
    processor's inputs, for the square size and a non-square one."""
    model, preprocess, hf, processor = built[family]
    side = model.cfg.image_size
    prompt = "Describe the image."
    for h, w in [(side, side), OTHER_SIZES[family][0]]:
        pil = photo_like(w, h, seed=7)
        pixels = preprocess(pil) if (h, w) == (side, side) else _native(model, pil)
        inputs = processor(images=pil, text=_full(model, "image", BODY, prompt), return_tensors="pt")
        with torch.no_grad():
            ref = hf.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        ours = model.generate(pixels.unsqueeze(0), prompt, max_new_tokens=5)
        assert ours == [model.tokenizer.decode(ref)], (h, w)


@pytest.mark.parametrize("name, family, other", [("vladva-qwen25vl3b", "qwen3vl", "vladva-qwen3vl2b"),
                                                 ("vladva-qwen3vl2b", "qwen25vl", "vladva-qwen25vl3b")])
def test_checkpoint_of_another_family_is_one_clear_error(dirs, name, family, other):
    import open_clip

    from vladva_openclip import BaseModelError

    with pytest.raises(BaseModelError) as info:
        open_clip.create_model(name, base_model=str(dirs[family]), device="meta")
    msg = str(info.value)
    assert str(dirs[family]) in msg and other in msg and name in msg, msg


@pytest.mark.parametrize("family", ["qwen25vl", "qwen3vl"])
def test_sizes_the_vision_tower_cannot_take_are_one_clear_error(built, family):
    model, _, _, _ = built[family]
    unit = model.backbone._unit(model.lvlm.config)
    with pytest.raises(ValueError, match=f"multiples of {unit}"):
        model.encode_image(torch.zeros(1, 3, unit + 4, unit))
    with pytest.raises(ValueError, match=f"multiples of {unit}"):
        model.image_input_ids((unit, unit * 2 + 1))


@pytest.mark.parametrize("family", ["qwen25vl", "qwen3vl"])
def test_native_transform_is_the_processors_geometry(dirs, built, family):
    """NativeTransform with the processor's pixel band gives the processor's own pixels (its PIL backend: same
    smart_resize size, bicubic, rescale, normalise) for photos of any size; encode_image on a list of them equals
    transformers on the processor's output. The default budget caps the tokens at the square input's."""
    import copy

    from transformers import AutoImageProcessor

    from vladva_openclip.transforms import NativeTransform

    model, _, hf, processor = built[family]
    processor = copy.copy(processor)
    processor.image_processor = AutoImageProcessor.from_pretrained(dirs[family], backend="pil")
    native = NativeTransform(model, max_pixels="processor")
    photos = [photo_like(500, 333, seed=5), photo_like(301, 640, seed=6)]
    pixels = [native(p) for p in photos]
    refs = []
    for pil, x in zip(photos, pixels):
        inputs = processor(images=pil, text=_full(model, "image", BODY), return_tensors="pt")
        flat, grid = model.backbone._patches(model.lvlm.config, x.unsqueeze(0))
        assert grid.tolist() == inputs["image_grid_thw"].tolist()
        torch.testing.assert_close(flat, inputs["pixel_values"], atol=1e-6, rtol=0)
        with torch.no_grad():
            refs.append(hf.model(**inputs).last_hidden_state[:, -1].float())
    with torch.no_grad():
        ours = model.encode_image(pixels)
    torch.testing.assert_close(ours, torch.cat(refs), atol=1e-5, rtol=1e-4)
    budget = NativeTransform(model)
    square = model.backbone.num_image_tokens(model.lvlm.config, model.cfg.image_size)
    for pil in photos:
        h, w = budget(pil).shape[-2:]
        assert model.backbone.num_image_tokens(model.lvlm.config, (h, w)) <= square
        assert abs(w / h - pil.width / pil.height) < 0.15  # the aspect ratio is kept



@pytest.mark.slow  # ~30-40 s each: transformers on four photographs at the processor's resolution
@pytest.mark.parametrize("family", ["qwen25vl", "qwen3vl"])
def test_default_resize_mode_is_the_closest_fixed_size_mode(built, family):
    """The registered fixed-size preprocess is the open_clip mode whose embeddings are closest to transformers' on
    the processor's output (real photographs of four aspect ratios; benchmarks/bench_qwen_preprocess.py has the
    figures over three models per family, with the native path beside them)."""
    from _helpers_layouts import resize_mode_agreement, sample_photos

    model, _, hf, processor = built[family]
    scores = resize_mode_agreement(model, hf, processor, sample_photos()[:4])
    means = {mode: sum(v) / len(v) for mode, v in scores.items() if mode != "other_image"}
    assert model.cfg.resize_mode == max(means, key=means.get), means
