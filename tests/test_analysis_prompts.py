"""Prompt search: candidate files, the shared-prefix fast path against the model's own forward, entropy against
transformers' LVLM forward, retrieval against the evaluator, caching, --apply."""
import itertools

import pytest
import torch
from _helpers_analysis import (  # noqa: F401  (fixtures)
    TINY,
    build_tiny,
    fixture_analysis_data,
    fixture_analysis_world,
    perturb_lora,
)

from vladva_openclip.analysis import (
    PromptFileError,
    PromptPair,
    PromptSearchConfig,
    _lvlm,
    apply_prompt_pair,
    default_prompt_pairs,
    load_prompt_pairs,
    search_prompts,
)

PROMPTS = ["Summary above image in one word:", "Describe this image in one word:", "In one word:"]


# ---- candidate files -------------------------------------------------------------------------------------------
def test_default_set_is_fifty_distinct_pairs_of_the_family():
    pairs = default_prompt_pairs()
    assert len(pairs) == 50 and len(set(pairs)) == 50
    assert len({p.image for p in pairs}) == 50 and len({p.text for p in pairs}) == 50
    assert pairs[0] == PromptPair("Summary above image in one word:", "Summary above sentence in one word:")
    assert all("word" in p.image and "word" in p.text for p in pairs)
    assert all("image" in p.image and "sentence" in p.text or "caption" in p.text or "text" in p.text
               for p in pairs)


def test_prompt_file_formats_and_errors(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text("Image A:\tText A:\nBoth towers:\r\n\n\n")  # CRLF and trailing newlines are fine
    assert load_prompt_pairs(f) == [PromptPair("Image A:", "Text A:"), PromptPair("Both towers:", "Both towers:")]
    cases = {
        "": "no prompts",
        "a\n\nb\n": r"blank line\(s\) 2",
        "a\tb\tc\n": "3 tab-separated fields",
        "a\t\n": "empty prompt",
        "a\tb\na\tb\n": "repeats candidate 1",
    }
    for text, message in cases.items():
        f.write_text(text)
        with pytest.raises(PromptFileError, match=message):
            load_prompt_pairs(f)
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompt_pairs(tmp_path / "missing.tsv")


def test_prompt_file_with_a_utf8_bom(tmp_path):
    """Editors on Windows start UTF-8 files with a byte-order mark: it is no part of the first prompt."""
    f = tmp_path / "p.tsv"
    f.write_bytes("\ufeffImage A:\tText A:\nBoth:\n".encode("utf-8"))
    pairs = load_prompt_pairs(f)
    assert pairs[0] == PromptPair("Image A:", "Text A:") and pairs[1] == PromptPair("Both:", "Both:")


# ---- the fast path equals the model ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_shared_prefix_path_equals_models_built_with_each_prompt(name):
    """One vision pass + one LLM prefix for all prompts gives what create_model(image_prompt=p) gives, LoRA on."""
    import open_clip

    model, _ = build_tiny(name)
    perturb_lora(model)
    size = model.cfg.image_size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    views = [_lvlm.prompt_view(model, image_prompt=p) for p in PROMPTS]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        fast = _lvlm.encode_images_with_prompts(model, views, x)
        slow = _lvlm.encode_images_with_prompts(model, views, x, reuse=False)
        for p, f, s in zip(PROMPTS, fast, slow):
            ref = open_clip.create_model(name, image_prompt=p, image_prompt_mode="handcrafted")
            ref.load_state_dict(model.state_dict(), strict=False)  # same LoRA weights; prompts differ
            expected = ref.eval().encode_image(x)
            assert torch.allclose(f, expected, atol=2e-5), (p, (f - expected).abs().max())
            assert torch.allclose(s, expected, atol=2e-5)
    # building the views did not freeze or unfreeze anything of the analysed model
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", TINY)
def test_summary_logits_equal_the_lvlm_forward(name):
    """Entropy is read from lm_head(embedding): that must be the LVLM's own next-token logits (transformers'
    forward on the same ids and pixels)."""
    model, _ = build_tiny(name, image_prompt_mode="handcrafted")
    size = model.cfg.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = _lvlm.image_input_ids(model).unsqueeze(0).expand(2, -1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = _lvlm.summary_logits(model, model.encode_image(x))
        kwargs = model.backbone.generation_inputs(model.lvlm, ids, mask, x)
        theirs = model.lvlm(**kwargs).logits[:, -1].float()
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


# ---- the search ------------------------------------------------------------------------------------------------
def _check_against_reference(model, preprocess, data, result, pairs):
    """Each row's numbers recomputed the slow way: a model view per prompt through encode_image/encode_text."""
    from vladva_openclip.analysis.metrics import components_for, cumulative_explained_variance, entropy_from_logits
    from vladva_openclip.eval.metrics import retrieval_metrics

    images = torch.stack([preprocess(data.images.load(i)) for i in range(len(data.images))])
    tokens = model.tokenizer(data.captions)
    for row, pair in zip(result.rows, pairs):
        view = _lvlm.prompt_view(model, pair.image, pair.text)
        with torch.no_grad():
            fi, ft = view.encode_image(images), view.encode_text(tokens)
        hi = entropy_from_logits(_lvlm.summary_logits(model, fi)).mean().item()
        ht = entropy_from_logits(_lvlm.summary_logits(model, ft)).mean().item()
        assert row.image_entropy == pytest.approx(hi, abs=1e-4) and row.text_entropy == pytest.approx(ht, abs=1e-4)
        ni, nt = torch.nn.functional.normalize(fi, dim=-1), torch.nn.functional.normalize(ft, dim=-1)
        cev = cumulative_explained_variance(ni)
        assert row.image_k90 == components_for(cev, 0.9) and row.image_k99 == components_for(cev, 0.99)
        assert torch.allclose(torch.tensor(row.image_cev, dtype=torch.float64), cev, atol=1e-5)
        assert row.text_k90 == components_for(cumulative_explained_variance(nt), 0.9)
        r = retrieval_metrics(ni, nt, data.caption_image, ks=(1,))
        assert row.t2i_r1 == pytest.approx(r["t2i_R@1"]) and row.i2t_r1 == pytest.approx(r["i2t_R@1"])


@pytest.mark.parametrize("name", TINY)
def test_search_prompts_matches_a_slow_recomputation(name, analysis_data, tmp_path):
    llava = name == "vladva-tiny-llava"
    model, preprocess = build_tiny(name, pretrained="synth_captioner") if llava else build_tiny(name)
    pairs = default_prompt_pairs()[:4 if llava else 3]
    cfg = PromptSearchConfig(batch_size=5, progress=False, permutations=200)
    result = search_prompts(model, preprocess, analysis_data, pairs, cfg)
    assert [r.index for r in result.rows] == list(range(len(pairs)))
    _check_against_reference(model, preprocess, analysis_data, result, pairs)
    # ranking: by score, ties to the earlier candidate; the recommendation is rank 1
    ranked = result.ranked
    assert [r.rank for r in ranked] == list(range(1, len(pairs) + 1))
    assert all((a.score, -a.index) >= (b.score, -b.index) for a, b in itertools.pairwise(ranked))
    assert result.recommended == PromptPair(ranked[0].image_prompt, ranked[0].text_prompt)
    assert set(result.correlations) >= {"image_entropy", "text_entropy", "image_k90", "score"}
    if not llava:
        return
    files = result.save(tmp_path / "out")
    assert {"csv", "json", "md", "entropy_png", "variance_png", "retrieval_png"} <= set(files)
    header = (tmp_path / "out" / "prompts.csv").read_text().splitlines()[0]
    assert "image_entropy" in header and "t2i_R@1" in header and "score" in header


def test_search_cache_is_used_and_keyed_by_weights(analysis_data, tmp_path, monkeypatch):
    model, preprocess = build_tiny("vladva-tiny-llava")
    pairs = default_prompt_pairs()[:2]
    cfg = PromptSearchConfig(batch_size=6, cache_dir=str(tmp_path / "cache"), progress=False, permutations=10)
    first = search_prompts(model, preprocess, analysis_data, pairs, cfg)

    def boom(*a, **k):
        raise AssertionError("the model ran although every prompt was cached")

    with monkeypatch.context() as m:
        m.setattr(_lvlm, "encode_images_with_prompts", boom)
        m.setattr(type(model), "encode_text", boom)
        again = search_prompts(model, preprocess, analysis_data, pairs, cfg)
    assert [(r.image_entropy, r.text_k90, r.t2i_r1) for r in again.rows] == \
        [(r.image_entropy, r.text_k90, r.t2i_r1) for r in first.rows]
    perturb_lora(model)  # other weights: other cache entries
    changed = search_prompts(model, preprocess, analysis_data, pairs, cfg)
    assert changed.rows[0].image_entropy != first.rows[0].image_entropy


def test_search_bad_input(analysis_data):
    model, preprocess = build_tiny("vladva-tiny-llava")
    cfg = PromptSearchConfig(progress=False)
    with pytest.raises(PromptFileError, match="no prompts"):
        search_prompts(model, preprocess, analysis_data, [], cfg)
    with pytest.raises(PromptFileError, match="empty prompt"):
        search_prompts(model, preprocess, analysis_data, [PromptPair("  ", "x")], cfg)
    with pytest.raises(TypeError, match="needs a VladVA model"):
        search_prompts(torch.nn.Linear(2, 2), preprocess, analysis_data, default_prompt_pairs()[:1], cfg)
    with pytest.raises(ValueError, match="unknown label-free score"):
        PromptSearchConfig(score="accuracy")


# ---- --apply ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, pretrained", [("vladva-tiny-llava", "synth_captioner"),
                                              ("vladva-tiny-qwen2vl", None)])
def test_applied_adapter_loads_and_uses_the_chosen_pair(name, pretrained, tmp_path):
    import open_clip

    model, _ = build_tiny(name, pretrained=pretrained)
    perturb_lora(model)  # the analysed weights' LoRA must travel with the applied prompts
    pair = PromptPair("Describe this image in one word:", "Describe this sentence in one word:")
    out = apply_prompt_pair(model, pair, tmp_path / "applied")
    loaded = open_clip.create_model(name, pretrained=str(out)).eval()
    assert loaded.cfg.image_prompt.text == pair.image and loaded.cfg.text_prompt.text == pair.text
    assert loaded.cfg.image_prompt.mode == model.cfg.image_prompt.mode  # modes kept (soft: initialised from it)
    size = model.cfg.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    tokens = model.tokenizer(["a red circle", "two blue squares"])
    view = _lvlm.prompt_view(model, pair.image, pair.text)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), view.encode_image(x), atol=1e-5)
        assert torch.allclose(loaded.encode_text(tokens), view.encode_text(tokens), atol=1e-5)
        assert torch.equal(loaded.logit_scale, model.logit_scale)


@pytest.mark.slow  # bfloat16 matmuls are emulated on many CPUs
def test_prompt_search_on_a_bf16_base(analysis_world):
    """A bfloat16 base (precision="bf16", as on GPUs): the shared-prefix path still matches the model's own forward
    in its precision, and entropies stay close to the fp32 model's (logits are read in fp32)."""
    from vladva_openclip.analysis import load_analysis_data

    analysis_data = load_analysis_data(analysis_world.retrieval_json, max_images=4)
    model16, pre = build_tiny("vladva-tiny-llava", pretrained="synth_captioner", precision="bf16")
    model32, _ = build_tiny("vladva-tiny-llava", pretrained="synth_captioner")
    assert model16.base_dtype == torch.bfloat16
    x = torch.stack([pre(analysis_data.images.load(i)) for i in range(2)])
    views = [_lvlm.prompt_view(model16, image_prompt=p) for p in PROMPTS[:2]]
    with torch.no_grad():
        for f, v in zip(_lvlm.encode_images_with_prompts(model16, views, x), views):
            ref = v.encode_image(x)
            assert f.dtype == torch.float32 and torch.allclose(f, ref, atol=0.05 * float(ref.abs().max()))
    cfg = PromptSearchConfig(batch_size=4, progress=False, permutations=10)
    r16 = search_prompts(model16, pre, analysis_data, default_prompt_pairs()[:2], cfg)
    r32 = search_prompts(model32, pre, analysis_data, default_prompt_pairs()[:2], cfg)
    for a, b in zip(r16.rows, r32.rows):
        assert a.image_entropy == pytest.approx(b.image_entropy, abs=0.05)
        assert a.text_entropy == pytest.approx(b.text_entropy, abs=0.05)
