"""The miniature (every analysis on the embedded default) at the test preset: real fine-tunes, every output."""
import json

import pytest

from vladva_openclip.analysis.miniature import PRESETS, preset, run_miniature


@pytest.mark.slow
def test_miniature_runs_every_analysis_and_reuses_its_fine_tunes(tmp_path, monkeypatch):
    cfg = preset("test", out=tmp_path / "out", work=tmp_path / "work", progress=False)
    summary = run_miniature(cfg)
    out = tmp_path / "out"
    for rel in ("prompts/prompts.csv", "prompts/prompts_retrieval_by_entropy.png", "next_token/next_tokens.csv",
                "next_token/next_tokens.png", "attention/attention_heads.csv", "attention/attention_maps_0.png",
                "attention/attention_entropy.png", "retention/retention.csv", "retention/retention.png",
                "summary.json"):
        assert (out / rel).is_file(), rel
    head = summary["headline"]
    assert set(head["retention"]) == {"base", "vladva", "contrastive", "e5v"}
    assert head["prompts"]["applied_adapter_loads_with_the_pair"] is True
    assert (out / "prompts_vladva" / "prompts.csv").is_file() and "mean_R@1" in head["prompts_vladva"]
    assert set(head["own_prompt_retrieval"]) == {"base", "vladva", "contrastive", "e5v"}
    timings = json.loads((out / "timings.json").read_text())
    assert timings["fine_tunes_reused"]["vladva"] is False and timings["fine_tune_seconds"]["vladva"] > 0
    assert len(json.loads((out / "prompts" / "prompts.json").read_text())["candidates"]) == PRESETS["test"]["n_prompts"]
    # the fine-tunes differ from the captioner (their own soft prompts and LoRA)
    assert head["next_token"]["vladva"]["image"]["mean_entropy"] != head["next_token"]["base"]["image"]["mean_entropy"]

    # a second run with the same training settings reuses the adapters instead of training again
    from vladva_openclip.demo import pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the adapters were there")

    monkeypatch.setattr(pipeline, "train_variant", no_training)
    monkeypatch.setattr(pipeline, "prepare_demo_data", no_training)  # nor renders the training split
    again = run_miniature(preset("test", out=tmp_path / "out2", work=tmp_path / "work", progress=False,
                                 retention_scenes=1))
    assert again["headline"]["attention"] == summary["headline"]["attention"]
    assert json.loads((tmp_path / "out2" / "timings.json").read_text())["fine_tunes_reused"] == \
        {"vladva": True, "contrastive": True, "e5v": True}
