"""The image + AR pass by caption-length groups: the same features, NLL sums and gradients as one batch padded to
its longest caption, with fewer tokens through the language model."""
import numpy as np
import pytest
import torch
from conftest import perturb_trainables
from PIL import Image

from vladva_openclip.model import length_groups


def _tokens(lengths, groups, fixed):
    return sum(len(g) * (fixed + max(lengths[i] for i in g)) for g in groups)


def test_length_groups_are_optimal_partitions_of_the_sorted_rows():
    import itertools

    lengths = [40, 3, 17, 0, 38, 9, 22, 5]
    fixed = 20
    groups = length_groups(lengths, fixed, max_groups=3)
    assert sorted(i for g in groups for i in g) == list(range(8)) and len(groups) <= 3
    # brute force over every split of the length-sorted rows into at most 3 contiguous groups
    order = sorted(range(8), key=lambda i: -lengths[i])
    best = min(_tokens(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, 8))], fixed)
               for k in range(3) for cuts in itertools.combinations(range(1, 8), k))
    assert _tokens(lengths, groups, fixed) == best < 8 * (fixed + 40)
    assert length_groups(lengths, fixed, max_groups=1) == [list(range(8))]
    assert length_groups([10, 10, 9, 10], fixed, max_groups=4) == [[0, 1, 2, 3]]  # saving < 5 %: one call


@pytest.mark.parametrize("name", ["vladva-tiny-llava", "vladva-tiny-qwen2vl", "vladva-tiny-llavanext", "vladva-tiny-qwen25vl", "vladva-tiny-qwen3vl"])
def test_grouped_pass_equals_one_padded_batch(name):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(name)
    perturb_trainables(model)
    model.train()
    tok = open_clip.get_tokenizer(name)
    words = [2, 30, 0, 25, 4, 12]  # very different long-caption lengths, one row without a long caption
    long = tok.long_captions([" ".join(["red square near a blue circle"] * n)[: 6 * n] for n in words],
                             context_length=64)
    # photos of different shapes: LLaVA-NeXT gives each its own number of image tokens
    gen = np.random.default_rng(0)
    sizes = [(64, 64), (128, 64), (64, 160), (96, 96), (200, 64), (64, 64)]
    images = torch.stack([preprocess(Image.fromarray(gen.integers(0, 255, (h, w, 3), dtype=np.uint8)))
                          for w, h in sizes])

    def run(groups):
        model.zero_grad(set_to_none=True)
        model.ar_length_groups = groups
        feats, nll, ntok = model.image_features_and_ar(images, long)
        (feats.square().sum() * 0.3 + nll.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return feats.detach(), nll.detach(), ntok, grads

    ref, got = run(1), run(4)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2], ref[2])
    assert set(got[3]) == set(ref[3]) and len(ref[3]) > 5
    for n in ref[3]:
        err = float((got[3][n] - ref[3][n]).abs().max() / (ref[3][n].abs().max() + 1e-12))
        assert err < 1e-4, (n, err)
    with torch.no_grad():
        seq = model._image_rows(model._check_image(images))
    img_len = seq.mask.sum(1)
    lengths = (long != model.pad_token_id).sum(1)
    if not seq.vision.layer_tokens:  # per-layer injected features (Qwen3-VL) keep the batch in one group
        assert len(length_groups((img_len + lengths).tolist(), 1, 4)) > 1  # the test took the grouped path
