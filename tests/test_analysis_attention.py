"""Attention maps: extraction against transformers' eager forward, the implementation restored, token -> image
position mapping (LLaVA patches, Qwen2-VL merged windows), maps and entropies."""
import math

import pytest
import torch
from _helpers_analysis import (  # noqa: F401  (fixtures)
    TINY,
    build_tiny,
    fixture_analysis_data,
    fixture_analysis_world,
    perturb_lora,
)

from vladva_openclip.analysis import _lvlm, attention_maps
from vladva_openclip.analysis.image_grid import ImageGrid, image_grid, to_spatial


def _impls(model):
    cfg = model.lvlm.config
    return [cfg._attn_implementation] + [getattr(cfg, k)._attn_implementation for k in cfg.sub_configs]


@pytest.mark.parametrize("name", TINY)
def test_summary_attention_equals_transformers_eager_forward(name):
    model, _ = build_tiny(name, image_prompt_mode="handcrafted")
    size = model.cfg.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    before = _impls(model)
    assert "eager" not in before
    with torch.no_grad(), _lvlm.summary_attention(model) as records:
        assert model.language_model.config._attn_implementation == "eager"  # switched inside only
        model.encode_image(x)
    assert _impls(model) == before  # restored afterwards
    ours = records[0].weights  # [B, L, H, T]

    # Reference: transformers' own LVLM forward on the same ids and pixels, eager attention, output_attentions.
    ids = _lvlm.image_input_ids(model).unsqueeze(0).expand(2, -1)
    kwargs = model.backbone.generation_inputs(model.lvlm, ids, torch.ones_like(ids), x)
    model.lvlm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            atts = model.lvlm(**kwargs, output_attentions=True).attentions
    finally:
        model.lvlm.set_attn_implementation("sdpa")
    theirs = torch.stack([a[:, :, -1, :] for a in atts], dim=1)
    assert ours.shape == theirs.shape == (2, model.lvlm.config.text_config.num_hidden_layers,
                                          model.lvlm.config.text_config.num_attention_heads, ids.shape[1])
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert torch.allclose(ours.sum(-1), torch.ones(ours.shape[:-1]), atol=1e-5)


def test_attention_implementation_restored_after_an_error():
    model, _ = build_tiny("vladva-tiny-llava")
    before = _impls(model)
    with pytest.raises(RuntimeError, match="boom"), _lvlm.eager_attention(model):
        raise RuntimeError("boom")
    assert _impls(model) == before
    # hooks are removed too: a plain forward afterwards records nothing and runs sdpa
    with _lvlm.summary_attention(model) as records:
        pass
    with torch.no_grad():
        model.encode_image(torch.zeros(1, 3, 64, 64))
    assert records == [] and _impls(model) == before


def test_qwen2vl_merged_tokens_map_to_their_windows():
    """Token k of Qwen2-VL's image covers the (patch * merge)-pixel window (k // cols, k % cols): checked through
    the backbone's own patchify (the order the vision tower and merger consume)."""
    from vladva_openclip.backbones.qwen2vl import patchify

    model, _ = build_tiny("vladva-tiny-qwen2vl")
    grid = image_grid(model)
    vc = model.lvlm.config.vision_config
    size, merge, patch = model.cfg.image_size, int(vc.spatial_merge_size), int(vc.patch_size)
    assert grid == ImageGrid(size // (patch * merge), size // (patch * merge), patch * merge)
    assert grid.num_tokens == len(_lvlm.image_token_positions(model))
    rows = torch.arange(size).div(grid.cell, rounding_mode="floor")
    window = (rows[:, None] * grid.cols + rows[None, :]).float()  # pixel -> index of its window, row-major
    pixels = window.expand(1, 3, size, size)
    flat, _ = patchify(pixels, patch, int(vc.temporal_patch_size), merge)
    per_token = flat.view(grid.rows * grid.cols, merge * merge, -1)  # each merged token: merge^2 patches
    for k in range(grid.rows * grid.cols):
        assert torch.all(per_token[k] == k), k


def test_llava_grid_and_cls_token():
    model, _ = build_tiny("vladva-tiny-llava")
    grid = image_grid(model)
    assert (grid.rows, grid.cols, grid.cell, grid.skip) == (4, 4, 16, 0)
    assert grid.num_tokens == len(_lvlm.image_token_positions(model))
    w = torch.arange(17.0)
    with_cls = to_spatial(w, ImageGrid(4, 4, 16, skip=1))
    assert with_cls[0, 0] == 1 and with_cls[3, 3] == 16  # CLS dropped, then row-major
    with pytest.raises(ValueError, match="expected 16 image tokens"):
        to_spatial(w, grid)


def test_attention_maps_before_after(analysis_data, tmp_path):
    before, pre = build_tiny("vladva-tiny-llava", pretrained="synth_captioner", use_lora=False,
                             image_prompt_mode="handcrafted")
    after, _ = build_tiny("vladva-tiny-llava", pretrained="synth_captioner")
    perturb_lora(after)
    result = attention_maps({"before": (before, pre), "after": (after, pre)}, analysis_data, image_indices=[0, 3])
    assert result.models == ["before", "after"] and result.layers == [0, 1] and result.heads == [0, 1, 2, 3]
    for m in result.models:
        maps = result.maps[m]
        assert maps.shape == (2, 2, 4, 4, 4)
        assert torch.allclose(maps.sum((-1, -2)), torch.ones(2, 2, 4), atol=1e-5)  # renormalised per head
        ent = result.head_entropy[m]
        assert ent.shape == (2, 4) and torch.all(ent > 0) and torch.all(ent <= math.log(16) + 1e-5)
        assert torch.all((result.image_mass[m] > 0) & (result.image_mass[m] <= 1 + 1e-6))
    assert result.max_entropy == pytest.approx(math.log(16))
    # the maps are the recorded attention: recompute one head by hand from the capture
    with torch.no_grad(), _lvlm.summary_attention(after) as rec:
        after.encode_image(torch.stack([pre(analysis_data.images.load(3))]))
    w = rec[0].weights[0, 1, 2, _lvlm.image_token_positions(after)]
    assert torch.allclose(result.maps["after"][1, 1, 2].flatten(), w / w.sum(), atol=1e-5)
    assert result.images[0].size == (64, 64)
    files = result.save(tmp_path / "attn", map_layers=[1], map_heads=[0, 2])
    assert {"csv", "json", "maps", "md", "maps_0", "maps_1", "entropy_png"} <= set(files)
    rows = (tmp_path / "attn" / "attention_heads.csv").read_text().splitlines()
    assert rows[0].startswith("model,layer,head,entropy") and len(rows) == 1 + 2 * 2 * 4
