"""The analyses on the registered real models (LLaVA-1.5-7B, Qwen2-VL-2B): their configs, templates, image
geometry (576 patches at 336 px; 256 merged tokens at 448 px) and real tokenizers, on a toy-sized base folder."""
import pytest
import torch
from _helpers_analysis import fixture_analysis_data, fixture_analysis_world, fixture_real_standin  # noqa: F401

from vladva_openclip.analysis import (
    PromptPair,
    PromptSearchConfig,
    _lvlm,
    apply_prompt_pair,
    attention_maps,
    load_analysis_data,
    next_tokens,
    search_prompts,
)
from vladva_openclip.analysis.image_grid import image_grid

GRIDS = {"vladva-llava7b": (24, 24, 14), "vladva-qwen2vl2b": (16, 16, 28)}
PAIRS = [PromptPair("Summary above image in one word:", "Summary above sentence in one word:"),
         PromptPair("Describe this image in one word:", "Describe this sentence in one word:")]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_every_analysis_runs_on_the_real_architecture(name, real_standin, analysis_world, analysis_data, tmp_path):
    import open_clip

    model, preprocess = real_standin(name)
    rows, cols, cell = GRIDS[name]
    grid = image_grid(model)
    assert (grid.rows, grid.cols, grid.cell) == (rows, cols, cell)
    assert grid.num_tokens == len(_lvlm.image_token_positions(model))

    # prompt search: the shared-prefix path against a per-prompt forward, on the real template and tokenizer
    x = torch.stack([preprocess(analysis_data.images.load(i)) for i in range(2)])
    views = [_lvlm.prompt_view(model, image_prompt=p.image) for p in PAIRS]
    with torch.no_grad():
        fast = _lvlm.encode_images_with_prompts(model, views, x)
        for f, v in zip(fast, views):
            assert torch.allclose(f, v.encode_image(x), atol=2e-5)
    small = load_analysis_data(analysis_world.retrieval_json, max_images=4)
    assert len(small.images) == 4 and len(small.captions) == 8
    result = search_prompts(model, preprocess, small, PAIRS, PromptSearchConfig(batch_size=4, progress=False,
                                                                              permutations=10))
    assert len(result.rows) == 2 and all(r.image_k90 >= 1 and r.text_entropy > 0 for r in result.rows)

    # --apply: a real base is not copied; the adapter loads on the same base folder with the chosen pair
    out = apply_prompt_pair(model, PAIRS[1], tmp_path / "applied")
    assert not (out / "base_model.safetensors").exists()
    base_dir = model.cfg.base_model
    loaded = open_clip.create_model(name, pretrained=str(out), base_model=base_dir)
    assert loaded.cfg.image_prompt.text == PAIRS[1].image

    # next tokens decoded by the real tokenizer; attention over the full image grid
    tokens = next_tokens({"m": (model, preprocess)}, small, image_indices=[0], caption_indices=[0], k=3)
    assert all(isinstance(t.token, str) for t in tokens.top["m"]["image:0"])
    attn = attention_maps({"m": (model, preprocess)}, small, image_indices=[1])
    assert attn.maps["m"].shape == (1, 2, 4, rows, cols)
    assert torch.allclose(attn.maps["m"].sum((-1, -2)), torch.ones(1, 2, 4), atol=1e-5)
    assert attn.images[0].size == (model.cfg.image_size, model.cfg.image_size)
