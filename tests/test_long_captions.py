"""Long captions (the AR targets), --ar-weight 0 and --seed: issue 10 points 3 and 7."""
from __future__ import annotations

import glob
import logging

import pytest
import torch
from conftest import perturb_trainables


@pytest.fixture(scope="module")
def tiny_llava():
    import open_clip

    import vladva_openclip  # noqa: F401

    model = open_clip.create_model("vladva-tiny-llava").eval()
    return model, open_clip.get_tokenizer("vladva-tiny-llava")


def _images(model, n: int) -> torch.Tensor:
    s = model.cfg.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(1))


def test_cut_long_caption_fills_its_row_and_a_complete_one_leaves_room_for_eos(tiny_llava, caplog):
    _, tok = tiny_llava
    long = "a red circle above a blue square " * 20
    with caplog.at_level(logging.WARNING):
        rows = tok.long_captions([long, "a red circle"], context_length=16)
    assert "no EOS target" in caplog.text
    assert bool((rows[0] != tok.pad_token_id).all())  # full row: the caption was cut
    assert rows[0].tolist() == tok.answer_ids(long)[:16]
    n = len(tok.answer_ids("a red circle"))
    assert rows[1, :n].tolist() == tok.answer_ids("a red circle") and bool((rows[1, n:] == tok.pad_token_id).all())
    # A caption of exactly L tokens has no room for its EOS: it is treated as cut, never as complete.
    exact = tok.long_captions([long], context_length=n)
    assert bool((exact != tok.pad_token_id).all())


def test_a_cut_caption_gets_no_eos_target(tiny_llava):
    model, tok = tiny_llava
    perturb_trainables(model, seed=3)
    img = _images(model, 2)
    long = "a red circle above a blue square " * 20
    rows = tok.long_captions([long, "a red circle"], context_length=16)
    _, nll, counts = model.image_features_and_ar(img, rows)
    n_complete = int((rows[1] != tok.pad_token_id).sum())
    assert counts.tolist() == [16.0, float(n_complete + 1)]  # the cut row: its 16 tokens and no EOS
    # Reference: full-logits cross-entropy over the same sequences; the cut row's targets stop at its last token.
    head = model.backbone.lm_head(model.lvlm)
    for b, with_eos in ((0, False), (1, True)):
        image_seq = model._image_rows(model._check_image(img[b:b + 1]))
        img_embeds = image_seq.embeds
        cap = rows[b][rows[b] != tok.pad_token_id]
        targets = torch.cat([cap, torch.tensor([tok.eos_token_id])]) if with_eos else cap
        seq = torch.cat([img_embeds[0], model.embedding(cap)]).unsqueeze(0)
        hidden = model._run_llm(seq, torch.ones(seq.shape[:2], dtype=torch.long),
                                torch.cat([model.image_input_ids(), cap]).unsqueeze(0), image=image_seq)[0]
        t_img = img_embeds.shape[1]
        logits = head(hidden[t_img - 1: t_img - 1 + targets.numel()]).float()
        ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        torch.testing.assert_close(nll[b], ref, atol=1e-4, rtol=1e-4)


def test_real_models_default_to_the_papers_lengths():
    from vladva_openclip.factory import build_config

    for name in ("vladva-llava7b", "vladva-llava13b", "vladva-qwen2vl2b"):
        cfg = build_config(name, {}, None)
        assert cfg.max_long_len == 500 and cfg.max_short_len == 32, name


def test_compute_ar_off_skips_the_long_caption_pass(tiny_llava, monkeypatch):
    model, tok = tiny_llava
    img = _images(model, 2)
    packed = torch.stack([tok(["a", "b"], context_length=12), tok.long_captions(["a long one", "x"], 12)], 1)
    calls = []
    original = type(model).image_features_and_ar

    def spy(self, *a, **kw):
        calls.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(type(model), "image_features_and_ar", spy)
    with_ar = model(img, packed)
    assert calls and "ar_nll_sum" in with_ar
    calls.clear()
    model.compute_ar = False
    try:
        out = model(img, packed)
    finally:
        model.compute_ar = True
    assert not calls and "ar_nll_sum" not in out
    torch.testing.assert_close(out["image_features"], with_ar["image_features"], atol=1e-5, rtol=1e-5)


def _train(tmp_path, name: str, *extra: str, monkeypatch=None) -> dict[str, torch.Tensor]:
    from vladva_openclip.train.main import main

    args = ["--model", "vladva-tiny-llava", "--dataset-type", "synthetic", "--synthetic-size", "8",
            "--batch-size", "4", "--workers", "0", "--logs", str(tmp_path), "--name", name, "--precision", "fp32",
            "--lr", "0", "--warmup", "0", "--epochs", "1", "--report-to", "", "--max-short-len", "16",
            "--max-long-len", "32", *extra]
    assert main(args) in (None, 0)
    ckpt = sorted(glob.glob(str(tmp_path / name / "checkpoints" / "epoch_*.pt")))[-1]
    return torch.load(ckpt, weights_only=True)["state_dict"]


def test_lora_init_follows_seed_and_ar_weight_zero_never_runs_the_long_pass(tmp_path, monkeypatch):
    from vladva_openclip.model import VladVA

    calls = []
    original = VladVA.image_features_and_ar

    def spy(self, *a, **kw):
        calls.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(VladVA, "image_features_and_ar", spy)
    # --lr 0: the checkpoint holds the initial LoRA weights.
    a = _train(tmp_path, "seed1a", "--seed", "1", "--ar-weight", "0")
    assert not calls, "--ar-weight 0 ran the long-caption pass"
    b = _train(tmp_path, "seed1b", "--seed", "1")
    assert calls, "the AR loss needs the long-caption pass"
    c = _train(tmp_path, "seed2", "--seed", "2", "--ar-weight", "0")
    lora = [k for k in a if "lora_A" in k]
    assert lora
    for k in lora:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert any(not torch.equal(a[k], c[k]) for k in lora)
