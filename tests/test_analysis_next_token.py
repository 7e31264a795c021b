"""Next-token view: top-k equals the LVLM's own next-token distribution, before/after, table and plot."""
import pytest
import torch
from _helpers_analysis import build_tiny, fixture_analysis_data, fixture_analysis_world, perturb_lora  # noqa: F401

from vladva_openclip.analysis import _lvlm, next_tokens
from vladva_openclip.analysis.metrics import entropy_from_logits


def test_next_tokens_are_the_lvlm_distribution(analysis_data, tmp_path):
    before, pre = build_tiny("vladva-tiny-llava", pretrained="synth_captioner", use_lora=False,
                             image_prompt_mode="handcrafted", text_prompt_mode="handcrafted")
    after, _ = build_tiny("vladva-tiny-llava", pretrained="synth_captioner")
    perturb_lora(after)  # soft prompts and LoRA moved: "after" uses them (its own prompts)
    result = next_tokens({"before": (before, pre), "after": (after, pre)}, analysis_data, image_indices=[1, 2],
                         caption_indices=[0, 5], k=5)
    assert [i.key for i in result.inputs] == ["image:1", "image:2", "caption:0", "caption:5"]
    assert result.inputs[2].title == analysis_data.captions[0]

    # image 2 under "before": transformers' LVLM forward on the same ids and pixels
    x = pre(analysis_data.images.load(2)).unsqueeze(0)
    ids = _lvlm.image_input_ids(before).unsqueeze(0)
    with torch.no_grad():
        logits = before.lvlm(**before.backbone.generation_inputs(before.lvlm, ids, torch.ones_like(ids), x)).logits
    probs = logits[0, -1].float().softmax(-1)
    top = result.top["before"]["image:2"]
    values, index = probs.topk(5)
    assert [t.token_id for t in top] == index.tolist()
    assert [t.prob for t in top] == pytest.approx(values.tolist(), abs=1e-5)
    assert [t.token for t in top] == [before.tokenizer.decode([i], skip_special_tokens=False) for i in index]
    assert result.entropy["before"]["image:2"] == pytest.approx(entropy_from_logits(logits[0, -1]).item(), abs=1e-4)

    # caption 5 under "after" (soft prompts, LoRA): lm_head of its text embedding
    with torch.no_grad():
        feats = after.encode_text(after.tokenizer([analysis_data.captions[5]]))
    p_after = _lvlm.summary_logits(after, feats)[0].softmax(-1)
    assert [t.token_id for t in result.top["after"]["caption:5"]] == p_after.topk(5).indices.tolist()
    assert not torch.allclose(p_after, _lvlm.summary_logits(before, before.encode_text(
        before.tokenizer([analysis_data.captions[5]])))[0].softmax(-1))  # the two models really differ

    # the averaged distribution and the summary
    s = result.summary["before"]["image"]
    assert s["n"] == 2 and 1 <= s["distinct_top1"] <= 2
    assert result.mean_top["before"]["image"][0].prob <= 1.0
    files = result.save(tmp_path / "nt")
    assert {"csv", "json", "md", "png"} <= set(files)
    lines = (tmp_path / "nt" / "next_tokens.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 4 * 5  # models x inputs x k


def test_next_tokens_with_a_handcrafted_prompt_and_bad_input(analysis_data):
    model, pre = build_tiny("vladva-tiny-llava", pretrained="synth_captioner")
    prompt = "Describe this image in one word:"
    result = next_tokens({"m": (model, pre)}, analysis_data, image_indices=[0], caption_indices=[], k=3,
                         image_prompt=prompt)
    view = _lvlm.prompt_view(model, image_prompt=prompt)
    with torch.no_grad():
        expected = _lvlm.summary_logits(model, view.encode_image(pre(analysis_data.images.load(0))[None]))
    assert [t.token_id for t in result.top["m"]["image:0"]] == expected[0].topk(3).indices.tolist()
    with pytest.raises(IndexError, match="out of range"):
        next_tokens({"m": (model, pre)}, analysis_data, image_indices=[99])
    with pytest.raises(ValueError, match="no models"):
        next_tokens({}, analysis_data)
    with pytest.raises(ValueError, match="nothing to show"):
        next_tokens({"m": (model, pre)}, analysis_data, image_indices=[], caption_indices=[])
