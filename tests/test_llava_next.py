"""LLaVA-NeXT-8B and E5-V side by side with transformers' own processor and model, in the real hub layout.

The checkpoint (tests/_helpers_llava_next.py) is llava-hf/llama3-llava-next-8b-hf's layout at tiny widths with the
real geometry (336-px tiles, patch 14, the five pinpoints) and the real LLaMA-3 vocabulary plus ``<image>`` = 128256
and ``<pad>`` = 128257. The references are ``LlavaNextProcessor`` / ``LlavaNextForConditionalGeneration`` on that
directory; E5-V's are its README's own strings and expressions (github.com/kongds/E5-V).

The anyres transform calls the processor's image processor, so pixels are identical by construction and embeddings
agree to float32 round-off (the tolerance is 1e-5 relative, measured ~1e-7).
"""
import pytest
import torch
from _helpers_layouts import photo_like
from _helpers_llava_next import needs_llama3, write_llava_next_dir

pytestmark = [needs_llama3, pytest.mark.slow]

NAMES = ("vladva-llavanext8b", "vladva-e5v")
# (width, height): landscape, portrait, square, extreme strips, small, odd sizes
SIZES = [(500, 400), (333, 600), (640, 640), (1000, 120), (90, 700), (50, 40), (337, 673), (1200, 900)]
CAPTIONS = ["a red circle", "Two dogs play in the snow.", " leading and  double spaces ", "ends with newline\n",
            "naïve café, 東京 — “quotes” 🐈", "1,000 items at 3.5% off!?", "tab\tseparated", ""]
SPECIAL_LOOKING = ["an <image> token", "<pad> and <|eot_id|>", "<|begin_of_text|>x<|start_header_id|>"]
# E5-V's README / retrieval.py, verbatim.
E5V_TEMPLATE = ('<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>'
                '<|start_header_id|>assistant<|end_header_id|>\n\n \n')
E5V_IMAGE = E5V_TEMPLATE.format('<image>\nSummary above image in one word: ')
E5V_TEXT = E5V_TEMPLATE.format('<sent>\nSummary above sentence in one word: ')


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_llava_next_dir(tmp_path_factory.mktemp("llava_next") / "llama3-llava-next-8b-tiny")


@pytest.fixture(scope="module")
def built(ckpt):
    """(models by name, preprocess, transformers model, AutoProcessor), all on the same directory."""
    import open_clip
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vladva_openclip  # noqa: F401

    models, preprocess = {}, None
    for name in NAMES:
        model, _, preprocess = open_clip.create_model_and_transforms(name, base_model=str(ckpt))
        models[name] = model.eval()
    hf = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    return models, preprocess, hf, AutoProcessor.from_pretrained(ckpt)


def _full(model, tower: str, body: str) -> str:
    template = getattr(model.cfg.template, tower)
    return template.replace("{body}", body).replace("{prompt}", getattr(model.cfg, f"{tower}_prompt").text)


def test_e5v_strings_are_e5vs_own():
    """The registered e5v templates and prompts rebuild E5-V's strings exactly (trailing spaces included)."""
    from vladva_openclip.config import VladVAConfig
    from vladva_openclip.registry import get_vladva_config

    cfg = VladVAConfig.from_dict(get_vladva_config("vladva-e5v")["vladva_cfg"])
    assert cfg.template.image.format(body="<image>", prompt=cfg.image_prompt.text) == E5V_IMAGE
    assert cfg.template.text.format(body="<sent>", prompt=cfg.text_prompt.text) == E5V_TEXT
    assert not cfg.lora.enabled and cfg.image_prompt.mode == cfg.text_prompt.mode == "handcrafted"


def test_full_size_parameter_count_on_meta():
    """llava-hf/llama3-llava-next-8b-hf's model card: 8.36B. Parts: LLaMA-3-8B (8,030,261,248) with the vocabulary
    grown to 128,320 rows in embeddings and lm_head, CLIP ViT-L/14-336 (303,507,456), the 2-layer projector and the
    image_newline vector."""
    import open_clip

    import vladva_openclip

    model = open_clip.create_model("vladva-llavanext8b", device="meta")
    lvlm = model.lvlm
    base = vladva_openclip.count_parameters(model)["base"]
    assert abs(base - 8.36e9) / 8.36e9 < 0.001, base
    llm = sum(p.numel() for n, p in lvlm.named_parameters()
              if "lora_" not in n and ("language_model" in n or "lm_head" in n))
    assert llm == 8_030_261_248 + 2 * (128_320 - 128_256) * 4096
    assert sum(p.numel() for p in lvlm.model.vision_tower.parameters()) == 303_507_456
    projector = sum(p.numel() for p in lvlm.model.multi_modal_projector.parameters())
    assert projector == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert lvlm.model.image_newline.numel() == 4096


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_anyres_pixels_are_the_processors(ckpt, backend):
    """Every view the packed tensor carries is the processor's, bit for bit; unused views are zeros."""
    from transformers import AutoImageProcessor

    from vladva_openclip.anyres import AnyresGeometry, AnyresTransform, unpack
    from vladva_openclip.registry import get_vladva_config

    geometry = AnyresGeometry.from_config(get_vladva_config("vladva-llavanext8b")["vladva_cfg"]["hf_config"])
    assert geometry.canvas == (5 * 336 + 1, 336)
    ours = AnyresTransform(geometry, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
                           backend=backend)
    processor = AutoImageProcessor.from_pretrained(ckpt, backend=backend)
    for seed, (w, h) in enumerate(SIZES[:5]):
        pil = photo_like(w, h, seed)
        ref = processor(images=pil, return_tensors="pt")
        views, sizes = unpack(ours(pil).unsqueeze(0), geometry)
        n = 1 + geometry.best_resolution(h, w)[0] // 336 * (geometry.best_resolution(h, w)[1] // 336)
        assert sizes.tolist() == ref["image_sizes"].tolist() == [[h, w]]
        assert torch.equal(views[0, :n], ref["pixel_values"][0, :n].float()), (w, h)
        assert not views[0, n:].any()


def test_token_count_rule_equals_the_processors_on_many_sizes(built):
    """``num_tokens`` against LlavaNextProcessor's own count for 600 sizes from 1 px to 2000 px sides."""
    _, _, _, processor = built
    from vladva_openclip.anyres import AnyresGeometry

    geometry = AnyresGeometry.from_config(built[0]["vladva-llavanext8b"].lvlm.config)
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 2000, (600, 2), generator=gen).tolist() + [[336, 336], [672, 1344], [1, 1000]]
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [geometry.num_tokens(h, w) for h, w in sizes] == expected


def test_image_ids_equal_processor_expansion(built):
    models, _, _, processor = built
    for name, model in models.items():
        for seed, (w, h) in enumerate(SIZES):
            inputs = processor(images=photo_like(w, h, seed), text=_full(model, "image", "<image>"),
                               return_tensors="pt")
            assert model.image_input_ids((h, w)).tolist() == inputs["input_ids"][0].tolist(), (name, w, h)
    e5v = models["vladva-e5v"]
    inputs = processor(images=photo_like(500, 400), text=E5V_IMAGE, return_tensors="pt")
    assert e5v.image_input_ids((400, 500)).tolist() == inputs["input_ids"][0].tolist()
    # default: a square image (every square image has one count)
    assert e5v.image_input_ids().tolist() == e5v.image_input_ids((999, 999)).tolist()


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_image_embedding_equals_transformers_on_processor_output(built, ckpt, backend):
    """One mixed batch through ``encode_image`` (different token counts per row) against transformers' model on the
    processor's output for each image alone; E5-V's own expression for E5-V (hidden_states[-1][:, -1, :])."""
    import copy

    from transformers import AutoImageProcessor

    from vladva_openclip.anyres import AnyresTransform

    models, preprocess, hf, processor = built
    processor = copy.copy(processor)
    processor.image_processor = AutoImageProcessor.from_pretrained(ckpt, backend=backend)
    transform = AnyresTransform(preprocess.geometry, preprocess.mean, preprocess.std, backend=backend)
    # strips: three different token counts (1233, 1296, 1694) at a fraction of a square image's 2946
    images = [photo_like(w, h, seed) for seed, (w, h) in enumerate([(1000, 120), (90, 700), (333, 600)])]
    batch = torch.stack([transform(im) for im in images])
    for name, model in models.items():
        if backend == "pil" and name == "vladva-e5v":
            continue  # the image path is the same model's; one family member per backend suffices
        text = E5V_IMAGE if name == "vladva-e5v" else _full(model, "image", "<image>")
        refs = []
        for im in images:
            inputs = processor(images=im, text=text, return_tensors="pt")
            with torch.no_grad():
                refs.append(hf(**inputs, output_hidden_states=True, return_dict=True,
                               logits_to_keep=1).hidden_states[-1][0, -1].float())
        with torch.no_grad():
            ours = model.encode_image(batch)
        refs = torch.stack(refs)
        rel = ((ours - refs).norm(dim=-1) / refs.norm(dim=-1)).max().item()
        assert rel <= 1e-5, f"{name}/{backend}: relative difference {rel:.2e}"


def test_embedding_does_not_depend_on_the_batch(built):
    models, preprocess, _, _ = built
    model = models["vladva-llavanext8b"]
    sizes = [(1000, 120), (90, 700), (200, 700)]
    images = torch.stack([preprocess(photo_like(w, h, s)) for s, (w, h) in enumerate(sizes)])
    with torch.no_grad():
        together = model.encode_image(images)
        alone = torch.cat([model.encode_image(images[i:i + 1]) for i in range(3)])
        reordered = model.encode_image(images[[2, 0, 1]])[[1, 2, 0]]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together, reordered, atol=1e-5, rtol=1e-5)
    # each row's sequence is the one image_input_ids reports for its size
    seq = model._image_rows(model._check_image(images))
    ids, mask = seq.ids, seq.mask
    for row, (w, h) in enumerate(sizes):
        assert ids[row][mask[row].bool()].tolist() == model.image_input_ids((h, w)).tolist()


def test_text_ids_and_embeddings_equal_the_tokenizer_and_transformers(built):
    models, _, hf, processor = built
    tok = processor.tokenizer
    for name, model in models.items():
        for caption in CAPTIONS:
            ref = tok(_full(model, "text", caption)).input_ids
            if name == "vladva-e5v":
                assert ref == tok(E5V_TEXT.replace("<sent>", caption)).input_ids  # E5-V's own string
            ids, mask = model.text_input_ids([caption])
            assert ids[0][mask[0].bool()].tolist() == ref, (name, caption)
            with torch.no_grad():
                want = hf.model(input_ids=torch.tensor([ref])).last_hidden_state[:, -1].float()
                got = model.encode_text(model.tokenizer([caption]))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_special_looking_captions_stay_plain_text(built):
    models, _, _, processor = built
    tok = processor.tokenizer
    specials = set(tok.all_special_ids) | {128256, 128257}
    for name, model in models.items():
        template_specials = sorted(t for t in tok(_full(model, "text", "")).input_ids if t in specials)
        ids, mask = model.text_input_ids(SPECIAL_LOOKING)
        for i, caption in enumerate(SPECIAL_LOOKING):
            got = ids[i][mask[i].bool()].tolist()
            assert sorted(t for t in got if t in specials) == template_specials, (name, caption)
            assert caption in tok.decode(got)


def test_long_captions_are_the_answer_of_the_whole_string(built):
    models, _, _, processor = built
    model = models["vladva-llavanext8b"]
    tok = processor.tokenizer
    for caption in ["The cat sits on the mat.", "two dogs\nand a cat", "é 東京"]:
        full = _full(model, "image", model.image_placeholder) + model.cfg.template.answer_sep + caption
        assert model.image_input_ids().tolist() + model.tokenizer.answer_ids(caption) == tok(full).input_ids


def test_plain_images_are_refused_with_one_clear_line(built):
    models, _, _, _ = built
    model = models["vladva-llavanext8b"]
    h, w = model.visual.image_size
    with pytest.raises(ValueError, match="preprocess transform"):
        model.encode_image(torch.zeros(1, 3, h, w))
    with pytest.raises(ValueError, match=rf"\[B,3,{h},{w}\]"):
        model.encode_image(torch.zeros(1, 3, 336, 336))


def test_generate_uses_transformers_generation_on_each_images_own_tokens(built):
    """``generate`` on a mixed batch equals transformers' generate on the processor's output, image by image."""
    models, preprocess, hf, processor = built
    model = models["vladva-llavanext8b"]
    images = [photo_like(1000, 120, 0), photo_like(90, 700, 1)]
    ours = model.generate(torch.stack([preprocess(im) for im in images]), prompt="Describe the image.",
                          max_new_tokens=4)
    base = model.lvlm
    for im, text in zip(images, ours):
        inputs = processor(images=im, text=_full(model, "image", "<image>").replace(model.cfg.image_prompt.text,
                                                                                    "Describe the image."),
                           return_tensors="pt")
        with torch.no_grad():
            # LoRA is freshly initialised (B = 0): the wrapped LVLM generates what the plain checkpoint generates
            out = hf.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=128257, eos_token_id=128009)
        assert processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == text
    assert base is model.lvlm


def test_truncation_cuts_the_caption_at_a_whole_string_boundary(built):
    models, _, _, processor = built
    hf = processor.tokenizer
    for name, model in models.items():
        tok = model.tokenizer
        caption = "a very long caption about " + "many red circles and blue squares, " * 20
        row = tok([caption], context_length=12)
        body = row[0][row[0] != tok.pad_token_id].tolist()
        assert 0 < len(body) <= 12
        matches = [c for c in tok.codec("text").caption_cut_points(caption) if tok.text_body(caption[:c]) == body]
        assert matches, "the truncated row is not the tokenization of a cut caption"
        got = model.text_prompt.prefix_id_list + body + model.text_prompt.suffix_id_list
        assert got == hf(_full(model, "text", caption[: matches[-1]])).input_ids, name
