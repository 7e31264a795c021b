"""The VladVA model against open_clip's model contract, on both tiny backbones."""
import logging

import pytest
import torch
from conftest import perturb_trainables


def _images(model, n, seed=0):
    s = model.cfg.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def test_encode_shapes_dtype_and_normalize(tiny):
    model, _, tok = tiny
    img = _images(model, 2)
    fi = model.encode_image(img)
    ft = model.encode_text(tok(["a red circle", "two blue squares"]))
    assert fi.shape == ft.shape == (2, model.embed_dim)
    assert fi.dtype == ft.dtype == torch.float32
    fin = model.encode_image(img, normalize=True)
    torch.testing.assert_close(fin.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(fin, torch.nn.functional.normalize(fi, dim=-1))


def test_forward_dict_contract(tiny):
    model, _, tok = tiny
    img, txt = _images(model, 3), tok(["a", "b c", "d e f"])
    out = model(img, txt)
    assert set(out) >= {"image_features", "text_features", "logit_scale", "logit_bias"}
    assert out["logit_bias"] is None
    torch.testing.assert_close(out["logit_scale"], model.logit_scale.exp())
    assert model(image=img)["text_features"] is None
    assert model(text=txt)["image_features"] is None
    torch.testing.assert_close(out["image_features"], model.encode_image(img, normalize=True))
    model.output_dict = False
    fi, ft, scale = model(img, txt)
    torch.testing.assert_close(ft, out["text_features"])


def test_text_padding_and_batch_invariance(tiny):
    """A caption's embedding alone equals its embedding inside a padded batch, whatever the batch holds."""
    model, _, tok = tiny
    perturb_trainables(model)  # active LoRA and soft prompts, so the invariance is not trivially about zeros
    caps = ["a small red circle", "a very large green star above a tiny yellow triangle on the left side", "x"]
    batch = model.encode_text(tok(caps))
    for i, cap in enumerate(caps):
        alone = model.encode_text(tok([cap]))
        torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=1e-5)
        # Extra padding columns change nothing.
        torch.testing.assert_close(model.encode_text(tok([cap], context_length=60))[0], batch[i], atol=1e-5, rtol=1e-5)
    shuffled = model.encode_text(tok(caps[::-1]))
    torch.testing.assert_close(shuffled.flip(0), batch, atol=1e-5, rtol=1e-5)


def test_image_batch_invariance(tiny):
    model, _, _ = tiny
    perturb_trainables(model)
    img = _images(model, 3)
    batch = model.encode_image(img)
    for i in range(3):
        torch.testing.assert_close(model.encode_image(img[i:i + 1])[0], batch[i], atol=1e-5, rtol=1e-5)


def test_truncation_cuts_caption_not_prompt(tiny, caplog):
    model, _, tok = tiny
    long_caption = " ".join(["red circle"] * 100)
    with caplog.at_level(logging.WARNING):
        ids = tok([long_caption], context_length=8)
    assert "truncated" in caplog.text
    assert ids.shape == (1, 8) and bool((ids != tok.pad_token_id).all())
    embeds, seq_ids, mask = model._text_sequence(ids)
    suffix = model.text_prompt.suffix_ids
    # The sequence ends with the complete prompt suffix; the caption part is the truncated caption.
    assert seq_ids[0, -suffix.numel():].tolist() == suffix.tolist()
    p = model.text_prompt.prefix_len
    assert seq_ids[0, p:p + 8].tolist() == ids[0].tolist()
    # The row is the whole-string tokenization of a prefix of the caption, cut at one of its token boundaries,
    # so the embedding is that of the shorter caption tokenized on its own.
    cuts = [c for c in tok.codec("text").caption_cut_points(long_caption)
            if tok([long_caption[:c]], context_length=100)[0].tolist()[:8] == ids[0].tolist()]
    assert cuts, "the truncated row is not the tokenization of any prefix of the caption"
    torch.testing.assert_close(model.encode_text(ids), model.encode_text(tok([long_caption[:cuts[0]]], context_length=8)))


def test_fused_pass_matches_encode_image_and_caption_cannot_change_summary(tiny):
    model, _, tok = tiny
    perturb_trainables(model)
    img = _images(model, 2)
    long_a = tok.long_captions(["a long detailed caption about shapes", "another one"], context_length=24)
    long_b = tok.long_captions(["completely different words here and more", "zzz"], context_length=24)
    fa, nll_a, n_a = model.image_features_and_ar(img, long_a)
    fb, nll_b, _ = model.image_features_and_ar(img, long_b)
    torch.testing.assert_close(fa, fb, atol=1e-6, rtol=0)
    torch.testing.assert_close(fa, model.encode_image(img, normalize=True), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(nll_a, nll_b)
    lengths = (long_a != tok.pad_token_id).sum(1)
    torch.testing.assert_close(n_a, (lengths + 1).float())


def test_ar_loss_matches_hf_reference(tiny):
    """The per-sample NLL equals a plain full-logits cross-entropy over the same sequence."""
    model, _, tok = tiny
    perturb_trainables(model)
    img = _images(model, 2)
    cap = tok.long_captions(["a red circle left of a square", "blue"], context_length=16)
    _, nll, count = model.image_features_and_ar(img, cap)
    for b in range(2):
        image_seq = model._image_rows(model._check_image(img[b:b + 1]))
        img_embeds, img_ids = image_seq.embeds, image_seq.ids
        n = int((cap[b] != tok.pad_token_id).sum())
        ids = torch.cat([cap[b, :n], torch.tensor([tok.eos_token_id])])
        seq = torch.cat([img_embeds[0], model.embedding(ids[:-1])]).unsqueeze(0)
        full_ids = torch.cat([img_ids[0], ids[:-1]]).unsqueeze(0)
        mask = torch.ones_like(full_ids)
        hidden = model._run_llm(seq, mask, full_ids, image=image_seq)
        logits = model.lvlm.lm_head(hidden[0, img_ids.shape[1] - 1:])
        ref = torch.nn.functional.cross_entropy(logits.float(), ids, reduction="sum")
        torch.testing.assert_close(nll[b], ref, atol=1e-4, rtol=1e-5)
        assert count[b] == n + 1


def test_packed_forward_masks_missing_long_caption(tiny):
    model, _, tok = tiny
    img = _images(model, 2)
    short = tok(["a", "b"], context_length=12)
    long = tok.long_captions(["some long caption", ""], context_length=12)
    out = model(img, torch.stack([short, long], 1))
    assert out["ar_num_tokens"][1] == 0 and out["ar_nll_sum"][1] == 0
    assert out["ar_nll_sum"][0] > 0
    model.train()
    with torch.no_grad():  # open_clip's accumulation caching pass (training, no grad): features and counts only
        cached = model(img, torch.stack([short, long], 1))
    model.eval()
    with torch.no_grad():  # evaluation: the AR loss is computed
        evaluated = model(img, torch.stack([short, long], 1))
    torch.testing.assert_close(evaluated["ar_nll_sum"], out["ar_nll_sum"].detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(cached["ar_nll_sum"], torch.zeros(2))
    torch.testing.assert_close(cached["ar_num_tokens"], out["ar_num_tokens"])
    torch.testing.assert_close(cached["image_features"], out["image_features"], atol=1e-5, rtol=1e-5)


def test_only_adapters_train_and_grad_checkpointing(tiny):
    model, _, tok = tiny
    groups = model.trainable_groups()
    assert len(groups["logit_scale"]) == 1 and len(groups["soft_prompt"]) == 2 and groups["lora"]
    assert all("lora_" in n for n, _ in groups["lora"])
    vision = model.backbone.frozen_towers(model.lvlm)
    assert not any(p.requires_grad for m in vision for p in m.parameters())
    assert not model.embedding.weight.requires_grad
    model.train()
    model.set_grad_checkpointing(True)
    perturb_trainables(model)
    img = _images(model, 2)
    packed = torch.stack([tok(["a", "b"], context_length=10), tok(["c d e", "f g"], context_length=10)], 1)
    out = model(img, packed)
    loss = (out["image_features"] @ out["text_features"].T).sum() * out["logit_scale"] + out["ar_nll_sum"].sum()
    loss.backward()
    for name, p in model.trainable_state_dict().items():
        param = dict(model.named_parameters())[name]
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert any(float(param.grad.abs().sum()) > 0 for _, param in groups["lora"])
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("bad, err", [
    (lambda s: torch.randn(3, s, s), ValueError),          # unbatched
    (lambda s: torch.randn(1, 1, s, s), ValueError),       # grayscale
    (lambda s: torch.randn(1, 3, s + 4, s), ValueError),   # wrong size
    (lambda s: torch.zeros(1, 3, s, s, dtype=torch.uint8), TypeError),
    (lambda s: [[0.0]], TypeError),
])
def test_bad_images_raise_clear_errors(tiny, bad, err):
    model, _, _ = tiny
    with pytest.raises(err, match="image"):
        model.encode_image(bad(model.cfg.image_size))


def test_bad_text_and_empty_inputs(tiny):
    model, _, tok = tiny
    with pytest.raises(TypeError, match="tokenizer"):
        model.encode_text(torch.randn(2, 5))
    with pytest.raises(ValueError, match="outside"):
        model.encode_text(torch.full((1, 4), 10 ** 6))
    with pytest.raises(TypeError, match="str"):
        tok([1, 2])
    empty = tok([])
    assert empty.shape == (0, model.context_length)
    assert model.encode_text(empty).shape == (0, model.embed_dim)
    s = model.cfg.image_size
    assert model.encode_image(torch.zeros(0, 3, s, s)).shape == (0, model.embed_dim)
    # An empty caption is a valid, well-defined input (the prompt alone).
    assert torch.isfinite(model.encode_text(tok([""]))).all()
