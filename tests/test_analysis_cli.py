"""`vladva analyze ...` end to end on the tiny models, and its errors for bad input."""
import json

import pytest
import torch
from _helpers_analysis import fixture_analysis_world  # noqa: F401  (fixture)

from vladva_openclip.cli import main

COMMON = ["--quiet", "--no-progress"]


def test_prompts_end_to_end_with_apply(analysis_world, tmp_path, capsys):
    import open_clip

    out, applied = tmp_path / "prompts", tmp_path / "applied"
    rc = main(["analyze", "prompts", "--model", "vladva-tiny-llava:synth_captioner",
               "--data", str(analysis_world.retrieval_json), "--limit", "3", "--max-images", "8",
               "--out", str(out), "--no-cache", "--permutations", "100", "--apply", str(applied), *COMMON])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "recommended pair" in printed and "score (entropy+rank)" in printed and "Spearman" in printed
    for f in ("prompts.csv", "prompts.json", "prompts.md", "prompts_entropy.png", "prompts_cumulative_variance.png",
              "prompts_retrieval_by_entropy.png"):
        assert (out / f).is_file(), f
    from vladva_openclip._fs import default_file_mode

    # written aside and renamed into place, with the permissions the umask asks for (not mkstemp's 0600)
    assert all((out / f).stat().st_mode & 0o777 == default_file_mode() for f in ("prompts.csv", "prompts_entropy.png"))
    report = json.loads((out / "prompts.json").read_text())
    assert len(report["candidates"]) == 3 and report["info"]["n_images"] == 8
    best = report["recommended"]
    model = open_clip.create_model("vladva-tiny-llava", pretrained=str(applied))
    assert (model.cfg.image_prompt.text, model.cfg.text_prompt.text) == (best["image"], best["text"])


def test_prompts_from_a_file_and_unpaired_data(analysis_world, tmp_path):
    prompts = tmp_path / "p.tsv"
    prompts.write_text("Summary above image in one word:\tSummary above sentence in one word:\nIn one word:\n")
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square above a green star\ntwo objects\n")
    out = tmp_path / "out"
    rc = main(["analyze", "prompts", "--model", "vladva-tiny-qwen2vl", "--images",
               str(analysis_world.retrieval_json.parent / "images"), "--max-images", "4", "--captions", str(captions),
               "--prompts", str(prompts), "--out", str(out), "--no-cache", "--no-plots", *COMMON])
    assert rc == 0
    report = json.loads((out / "prompts.json").read_text())
    assert [c["text_prompt"] for c in report["candidates"]] == ["Summary above sentence in one word:",
                                                                "In one word:"]
    assert report["info"]["paired"] is False and report["correlations"] == {}
    assert report["candidates"][0]["t2i_r1"] is None  # no pairing: no retrieval (NaN -> null)


def test_next_token_attention_retention_end_to_end(analysis_world, tmp_path, capsys):
    data = ["--data", str(analysis_world.retrieval_json)]
    models = ["--model", "before=vladva-tiny-llava:synth_captioner", "--model", "random=vladva-tiny-llava"]
    assert main(["analyze", "next-token", *models, *data, "--image-index", "0", "1", "--caption-index", "0,3",
                 "-k", "3", "--out", str(tmp_path / "nt"), *COMMON]) == 0
    rows = (tmp_path / "nt" / "next_tokens.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 4 * 3
    assert main(["analyze", "attention", *models, *data, "--image-index", "2", "--layers", "1", "--heads", "0,3",
                 "--out", str(tmp_path / "attn"), *COMMON]) == 0
    assert (tmp_path / "attn" / "attention_maps_0.png").is_file()
    summary = json.loads((tmp_path / "attn" / "attention.json").read_text())["summary"]
    assert set(summary) == {"before", "random"}
    assert main(["analyze", "retention", *models, "--n-scenes", "1", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "ret"), *COMMON]) == 0
    ret = json.loads((tmp_path / "ret" / "retention.json").read_text())
    assert ret["info"]["scenes"] == {"world_seed": 7, "split": "train", "n": 1, "long_captions": "compact"}
    printed = capsys.readouterr().out
    assert "object_precision" in printed and "written:" in printed


def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_bad_input_gives_one_clear_error(analysis_world, tmp_path, capsys):
    data = ["--data", str(analysis_world.retrieval_json), "--out", str(tmp_path / "x"), *COMMON]
    tiny = ["analyze", "prompts", "--no-cache", "--model", "vladva-tiny-llava"]
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    assert "no prompts" in _error(capsys, [*tiny, "--prompts", str(empty), *data])
    blank = tmp_path / "blank.tsv"
    blank.write_text("Summary above image in one word:\n\nIn one word:\n")
    assert "blank line(s) 2" in _error(capsys, [*tiny, "--prompts", str(blank), *data])
    assert "--limit must be >= 1" in _error(capsys, [*tiny, "--limit", "0", *data])
    # a checkpoint of another model
    import open_clip

    from vladva_openclip import save_adapter

    other = tmp_path / "qwen_adapter"
    save_adapter(open_clip.create_model("vladva-tiny-qwen2vl"), other)
    err = _error(capsys, ["analyze", "attention", "--model", f"vladva-tiny-llava:{other}", *data])
    assert "cannot build model" in err and "another base model" in err and "vladva-tiny-qwen2vl" in err
    pt = tmp_path / "qwen.pt"
    torch.save({"state_dict": open_clip.create_model("vladva-tiny-qwen2vl").trainable_state_dict()}, pt)
    err = _error(capsys, ["analyze", "next-token", "--model", f"vladva-tiny-llava:{pt}", *data])
    assert "cannot build model" in err and "shape" in err
    assert "not a VladVA model" in _error(capsys, ["analyze", "attention", "--model", "ViT-B-32", *data])
    err = _error(capsys, ["analyze", "attention", "--model", "vladva-tiny-llava", "--layers", "5", *data])
    assert "layers [5] do not exist" in err
    assert "several models are labelled ['a']" in _error(
        capsys, ["analyze", "next-token", "--model", "a=vladva-tiny-llava", "--model", "a=vladva-tiny-llava", *data])
    assert "does not exist" in _error(capsys, [*tiny, "--prompts", str(tmp_path / "nope.tsv"), *data])


def test_help_lists_the_analyses(capsys):
    with pytest.raises(SystemExit) as info:
        main(["analyze", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("prompts", "next-token", "attention", "retention", "miniature"))
