"""The ids the LLM sees equal the REAL base tokenizer's on the full templated string.

Uses the real LLaVA-1.5 (LLaMA sentencepiece-BPE) and Qwen2-VL (byte-level BPE) vocabularies rebuilt offline in
../shared/data/tokenizers, with every registered full-size model built on the meta device (no weights).
"""
from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import pytest
import torch
from _helpers_layouts import SHARED_TOKENIZERS

pytestmark = pytest.mark.skipif(not SHARED_TOKENIZERS.is_dir(),
                                reason=f"real tokenizers absent ({SHARED_TOKENIZERS}); they ship in ../shared/data")

MODELS = {"vladva-llava7b": "llava-1.5", "vladva-llava13b": "llava-1.5", "vladva-qwen2vl2b": "qwen2-vl",
          "vladva-qwen25vl3b": "qwen2-vl", "vladva-qwen25vl7b": "qwen2-vl", "vladva-qwen25vl72b": "qwen2-vl",
          "vladva-qwen3vl2b": "qwen3", "vladva-qwen3vl4b": "qwen3", "vladva-qwen3vl8b": "qwen3"}

CAPTIONS = [
    "a red circle",
    "A red circle.",
    " leading space",
    "trailing space ",
    "double  spaces  inside",
    "   ",
    "ends with punctuation!?",
    "two\nlines\n",
    "tab\tseparated",
    "naïve café, 東京 and Ünïcödé — “quotes”",
    "emoji 🐈 cat",
    "1,000 items at 3.5% off",
    "",
    "a caption that is quite a bit longer than the others, with commas, and clauses; and more words.",
]
# Text that looks like special tokens: stays plain text (never an image slot or an end-of-turn).
SPECIAL_LOOKING = ["an <image> token", "<pad><s></s>", "end <|im_end|> turn", "<|vision_start|>x<|image_pad|>"]


@pytest.fixture(scope="module")
def real_tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for family in sorted(set(MODELS.values())):
        src = SHARED_TOKENIZERS / family
        dest = tmp_path_factory.mktemp(family)
        shutil.copy(src / "tokenizer_config.json", dest / "tokenizer_config.json")
        with gzip.open(src / "tokenizer.json.gz", "rb") as f, open(dest / "tokenizer.json", "wb") as g:
            shutil.copyfileobj(f, g)
        out[family] = dest
    return out


@pytest.fixture(scope="module")
def meta_models(real_tokenizer_dirs):
    import open_clip
    from transformers import AutoTokenizer

    import vladva_openclip  # noqa: F401

    out = {}
    for name, family in MODELS.items():
        model = open_clip.create_model(name, device="meta", tokenizer=str(real_tokenizer_dirs[family]))
        out[name] = (model, AutoTokenizer.from_pretrained(str(real_tokenizer_dirs[family])))
    return out


def _reference(model, hf, modality: str, body: str, prompt: str | None = None) -> list[int]:
    tmpl = model.cfg.template
    pr = prompt if prompt is not None else getattr(model.cfg, f"{modality}_prompt").text
    full = getattr(tmpl, modality).format(body=body, prompt=pr)
    return hf(full, add_special_tokens=tmpl.add_bos).input_ids


@pytest.mark.parametrize("name", sorted(MODELS))
def test_text_tower_ids_equal_whole_string(meta_models, name):
    model, hf = meta_models[name]
    ids, mask = model.text_input_ids(CAPTIONS)
    assert ids.device.type == "cpu" and ids.dtype == torch.long and mask.shape == ids.shape
    for i, caption in enumerate(CAPTIONS):
        got = ids[i][mask[i].bool()].tolist()
        assert got == _reference(model, hf, "text", caption), (name, caption, hf.convert_ids_to_tokens(got))
        # padding is on the right and is pad_token_id
        assert bool(mask[i, : int(mask[i].sum())].all()) and bool((ids[i][~mask[i].bool()] == model.pad_token_id).all())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_text_tower_keeps_special_looking_text_plain(meta_models, name):
    model, hf = meta_models[name]
    ids, mask = model.text_input_ids(SPECIAL_LOOKING)
    specials = set(hf.all_special_ids) | {model.backbone.image_token_id(model.lvlm.config)}
    template_ids = _reference(model, hf, "text", "")
    for i, caption in enumerate(SPECIAL_LOOKING):
        got = ids[i][mask[i].bool()].tolist()
        # The only special ids are the template's own; the caption decodes back to itself.
        assert sorted(t for t in got if t in specials) == sorted(t for t in template_ids if t in specials)
        assert caption in hf.decode(got)
        # Reference: the same whole string with the caption's special literals split as plain text.
        plain = hf(caption, add_special_tokens=False, split_special_tokens=True).input_ids
        assert not set(plain) & specials


@pytest.mark.parametrize("name", sorted(MODELS))
def test_image_tower_ids_equal_processor_expansion(meta_models, name):
    model, hf = meta_models[name]
    ids = model.image_input_ids()
    assert ids.device.type == "cpu" and ids.dim() == 1
    config = model.lvlm.config
    n = model.backbone.num_image_tokens(config, model.cfg.image_size)
    if model.cfg.backbone == "llava":
        assert n == int(config.image_seq_length) == 576
        placeholder = "<image>" * n
    else:
        placeholder = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
    assert model.image_placeholder == placeholder
    assert ids.tolist() == _reference(model, hf, "image", placeholder)
    assert int((ids == model.backbone.image_token_id(config)).sum()) == n


@pytest.mark.parametrize("name", sorted(MODELS))
def test_soft_prompt_slots_hold_the_handcrafted_ids(meta_models, name):
    model, hf = meta_models[name]
    for modality in ("image", "text"):
        prompt = getattr(model, f"{modality}_prompt")
        text = getattr(model.cfg, f"{modality}_prompt").text
        slots = prompt.suffix_id_list[: prompt.num_soft]
        assert prompt.num_soft > 0 and hf.decode(slots).strip() == text


@pytest.mark.parametrize("name", sorted(MODELS))
def test_long_captions_are_the_answer_of_the_whole_string(meta_models, name):
    model, hf = meta_models[name]
    tok = model.tokenizer
    image_ids = model.image_input_ids().tolist()
    sep = model.cfg.template.answer_sep
    for caption in ["The cat sits on the mat.", "two dogs\nand a cat", "é 東京", "x"]:
        full = model.cfg.template.image.format(body=model.image_placeholder, prompt=model.cfg.image_prompt.text)
        ref = hf(full + sep + caption, add_special_tokens=model.cfg.template.add_bos).input_ids
        assert image_ids + tok.answer_ids(caption) == ref, caption
    assert tok.answer_ids("") == []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_truncation_cuts_the_caption_at_a_whole_string_boundary(meta_models, name, caplog):
    model, hf = meta_models[name]
    tok = model.tokenizer
    caption = "a very long caption about " + "many red circles and blue squares, " * 20
    with caplog.at_level(logging.WARNING):
        row = tok([caption], context_length=12)
    assert "truncated" in caplog.text
    body = row[0][row[0] != tok.pad_token_id].tolist()
    assert len(body) <= 12
    # The cut row is exactly the whole-string tokenization of a prefix of the caption ending at a token boundary.
    cuts = tok.codec("text").caption_cut_points(caption)
    matches = [c for c in cuts if tok([caption[:c]], context_length=1000)[0][: len(body)].tolist() == body
               and len(tok.text_body(caption[:c])) == len(body)]
    assert matches, "the truncated row is not the tokenization of a cut caption"
    got = model.text_prompt.prefix_id_list + body + model.text_prompt.suffix_id_list
    assert got == _reference(model, hf, "text", caption[: matches[-1]])
    # The prompt and the template tail survive whole.
    assert got[-len(model.text_prompt.suffix_id_list):] == model.text_prompt.suffix_id_list


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generate_prompt_is_the_whole_string(meta_models, name):
    model, hf = meta_models[name]
    split = model._image_split(model.tokenizer, "Describe the image in detail.")
    assert split.ids == _reference(model, hf, "image", model.image_placeholder, "Describe the image in detail.")


def test_the_old_piecewise_assembly_differs_from_the_real_tokenizer(real_tokenizer_dirs):
    """The defect this file guards against, shown on the real LLaMA vocabulary (so the tests above can fail)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(real_tokenizer_dirs["llava-1.5"]))
    pieces = [hf("USER: ", add_special_tokens=True).input_ids, hf("a red circle", add_special_tokens=False).input_ids,
              hf("\n", add_special_tokens=False).input_ids]
    whole = hf("USER: a red circle\n", add_special_tokens=True).input_ids
    assert sum(pieces, []) != whole


@pytest.mark.parametrize("name", sorted(MODELS))
def test_truncation_keeps_the_longest_fitting_cut(meta_models, name):
    """The bisection over cut points returns what a scan of every cut from the end returns."""
    model, _ = meta_models[name]
    tok = model.tokenizer
    captions = ["a very long caption about " + "many red circles and blue squares, " * 12,
                "Ünïcödé  text\twith  odd spacing 🐱 and punctuation!!! " * 6]
    for caption in captions:
        cuts = [0] + tok.codec("text").caption_cut_points(caption)
        for length in (5, 9, 17, 40):
            scan = next(b for c in reversed(cuts) if len(b := tok.text_body(caption[:c])) <= length)
            body, cut = tok._fit_caption(caption, length)
            assert cut and body == scan, (caption[:30], length)


@pytest.mark.parametrize("name", ["vladva-llava7b", "vladva-qwen2vl2b"])
def test_a_huge_caption_is_bounded_by_characters_with_the_same_ids(meta_models, name):
    """Only char_bound characters of a caption are tokenized (issue 22: a 5 MB table cell cost 16 s a batch): the
    rows equal those of the unbounded tokenization, and a 5 MB caption costs what a short one does."""
    import time

    model, _ = meta_models[name]
    tok = model.tokenizer
    assert tok.max_token_chars == max(len(t) for t in tok.tokenizer.get_vocab())
    for length in (12, 77):
        bound = tok.char_bound(length)
        captions = ["many red circles and blue squares, " * (bound // 20),  # longer than the bound
                    "Ünïcödé  text\twith  odd spacing 🐱 " * (bound // 15), "x" * (2 * bound), "a short one"]
        for caption in captions:
            full, _ = tok._fit_caption(caption, length)  # the whole text, as before
            assert tok([caption], context_length=length)[0][: len(full)].tolist() == full
            assert tok.long_captions([caption], length)[0].tolist() == tok.answer_ids(caption)[:length] + \
                [tok.pad_token_id] * max(0, length - len(tok.answer_ids(caption)))
    huge = "word " * 1_000_000  # 5 MB
    tok([huge[:1000]])
    start = time.perf_counter()
    row = tok([huge])
    assert time.perf_counter() - start < 2.0  # unbounded: about 16 s on the 2-core CPU
    assert row.shape == (1, tok.context_length)
