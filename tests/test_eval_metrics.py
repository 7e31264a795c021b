"""Metrics against hand-computed cases, brute-force references and CLIP_benchmark, with ties and NaN."""
import pytest
import torch

from vladva_openclip.eval import metrics as M


def matmul(a, b):
    return a @ b.T


# 5 captions x 3 images; captions 0,1 describe image 0, caption 2 image 1, captions 3,4 image 2.
S = torch.tensor([[0.9, 0.1, 0.2],
                  [0.3, 0.5, 0.1],
                  [0.4, 0.4, 0.4],   # all tied: pessimistic rank 2
                  [0.8, 0.7, 0.6],
                  [0.1, 0.2, 0.3]])
OWNER = torch.tensor([0, 0, 1, 2, 2])


def test_group_ranks_hand_computed_both_directions():
    images = torch.arange(3)
    t2i = M.group_ranks(S, torch.eye(3), OWNER, images, similarity=matmul)
    assert t2i.tolist() == [0, 1, 2, 2, 0]
    # image -> text: image 0 best positive 0.9 (none above); image 1 positive 0.4 with 0.5, 0.7 above;
    # image 2 best positive 0.6 (caption 3), nothing else >= 0.6
    i2t = M.group_ranks(torch.eye(3), S, images, OWNER, similarity=matmul)
    assert i2t.tolist() == [0, 2, 0]


def test_retrieval_metrics_hand_computed():
    out = M.retrieval_metrics(torch.eye(3), S, OWNER, ks=(1, 2, 3), similarity=matmul)
    assert out["t2i_R@1"] == pytest.approx(40.0)
    assert out["t2i_R@2"] == pytest.approx(60.0)
    assert out["t2i_R@3"] == pytest.approx(100.0)
    assert out["i2t_R@1"] == pytest.approx(200 / 3)
    assert out["i2t_R@2"] == pytest.approx(200 / 3)
    assert out["i2t_R@3"] == pytest.approx(100.0)
    assert out["t2i_mean_rank"] == pytest.approx((1 + 2 + 3 + 3 + 1) / 5)


def test_constant_embeddings_score_zero_retrieval():
    emb_i, emb_t = torch.ones(20, 8) / 8 ** 0.5, torch.ones(60, 8) / 8 ** 0.5
    owner = torch.arange(20).repeat_interleave(3)
    out = M.retrieval_metrics(emb_i, emb_t, owner, similarity=matmul)
    assert all(out[f"{d}_R@{k}"] == 0.0 for d in ("t2i", "i2t") for k in (1, 5, 10))


def _brute_force_ranks(sim, qgroup, ggroup):
    ranks = []
    for q in range(sim.shape[0]):
        pos = [g for g in range(sim.shape[1]) if ggroup[g] == qgroup[q]]
        best = max(sim[q, g].item() for g in pos)
        ranks.append(sum(1 for g in range(sim.shape[1]) if ggroup[g] != qgroup[q] and sim[q, g].item() >= best))
    return ranks


def test_group_ranks_matches_brute_force_with_ties_and_tiles():
    gen = torch.Generator().manual_seed(0)
    # few distinct values: many exact ties between captions of different images
    images = torch.randint(0, 3, (13, 4), generator=gen).float()
    texts = torch.randint(0, 3, (40, 4), generator=gen).float()
    owner = torch.randint(0, 13, (40,), generator=gen)
    owner[:13] = torch.arange(13)  # every image has a caption
    sim = texts @ images.T
    expect_t2i = _brute_force_ranks(sim, owner, torch.arange(13))
    expect_i2t = _brute_force_ranks(sim.T, torch.arange(13), owner)
    for tile in (1, 7, 40, 1 << 20):  # one row per tile ... everything in one tile
        t2i = M.group_ranks(texts, images, owner, torch.arange(13), similarity=matmul, tile_elements=tile)
        i2t = M.group_ranks(images, texts, torch.arange(13), owner, similarity=matmul, tile_elements=tile)
        assert t2i.tolist() == expect_t2i
        assert i2t.tolist() == expect_i2t


def test_retrieval_matches_clip_benchmark_without_ties():
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval", reason="clip-benchmark not installed")
    gen = torch.Generator().manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(30, 16, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(140, 16, generator=gen), dim=-1)
    owner = torch.cat([torch.arange(30), torch.randint(0, 30, (110,), generator=gen)])
    ours = M.retrieval_metrics(images, texts, owner, ks=(1, 5, 10), similarity=matmul)
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(140), owner] = True
    for k in (1, 5, 10):
        t2i = (zr.batchify(zr.recall_at_k, scores, positive, 64, "cpu", k=k) > 0).float().mean().item()
        i2t = (zr.batchify(zr.recall_at_k, scores.T, positive.T, 64, "cpu", k=k) > 0).float().mean().item()
        assert ours[f"t2i_R@{k}"] == pytest.approx(100 * t2i)
        assert ours[f"i2t_R@{k}"] == pytest.approx(100 * i2t)


def test_nan_embeddings_count_as_misses():
    images = torch.full((4, 3), float("nan"))
    texts = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    out = M.retrieval_metrics(images, texts, torch.arange(4), ks=(1, 3), similarity=matmul)
    assert out["t2i_R@1"] == out["i2t_R@1"] == out["t2i_R@3"] == 0.0


def test_sugarcrepe_strict_ties_are_wrong():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    neg = torch.tensor([[0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])  # right, wrong, tie
    assert M.sugarcrepe_correct(img, pos, neg).tolist() == [True, False, False]


def test_sugarcrepe_pp_hand_computed():
    e = torch.eye(3)
    a = torch.nn.functional.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)  # s(a, e0) == s(a, e1) exactly
    # ex 0: I=a, P1=e0, P2=e1, N=e2: ITT right; TOT s(P1,P2)=0 ties s(P1,N)=0 -> wrong
    # ex 1: I=a, P1=a, P2=N=e1: s(I,P1)=1 > s(I,N) but s(I,P2) ties s(I,N) -> ITT wrong; TOT tie -> wrong
    # ex 2: I=N=e2, P1=P2=e0: ITT wrong (s(I,N)=1 is largest); TOT s(P1,P2)=1 > 0 twice -> right
    image = torch.stack([a, a, e[2]])
    p1 = torch.stack([e[0], a, e[0]])
    p2 = torch.stack([e[1], e[1], e[0]])
    neg = torch.stack([e[2], e[1], e[2]])
    out = M.sugarcrepe_pp_correct(image, p1, p2, neg)
    assert out["itt"].tolist() == [True, False, False]
    assert out["tot"].tolist() == [False, False, True]
    assert out["img_p1_neg"].tolist() == [True, True, False]
    assert out["img_p2_neg"].tolist() == [True, False, False]
    assert set(M.sugarcrepe_pp_correct(None, p1, p2, neg)) == {"tot"}


def _wino(s00, s01, s10, s11):
    """Scores s(c, i) = c . i with i0 = e0, i1 = e1, so c0 = (s00, s01) and c1 = (s10, s11)."""
    out = M.winoground_correct(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]),
                               torch.tensor([[s00, s01]]), torch.tensor([[s10, s11]]))
    return tuple(out[k].item() for k in ("text", "image", "group"))


def test_winoground_hand_computed_and_ties():
    assert _wino(1.0, 0.2, 0.9, 1.0) == (True, True, True)
    assert _wino(0.5, 0.6, 0.1, 0.9) == (True, False, False)   # text right, image wrong (s00 < s01)
    assert _wino(0.5, 0.1, 0.6, 0.9) == (False, True, False)   # image right, text wrong (s00 < s10)
    assert _wino(0.0, 1.0, 1.0, 0.0) == (False, False, False)  # swapped
    assert _wino(1.0, 1.0, 0.5, 1.5) == (True, False, False)   # image: s00 ties s01 -> wrong
    assert _wino(0.7, 0.7, 0.7, 0.7) == (False, False, False)  # constant model: all ties
    # batched form agrees with the scalar cases
    c0, c1 = torch.tensor([[1.0, 0.2], [0.5, 0.6]]), torch.tensor([[0.9, 1.0], [0.1, 0.9]])
    i0, i1 = torch.tensor([[1.0, 0.0]] * 2), torch.tensor([[0.0, 1.0]] * 2)
    out = M.winoground_correct(i0, i1, c0, c1)
    assert out["text"].tolist() == [True, True] and out["image"].tolist() == [True, False]


def test_classification_hand_computed_pessimistic_ties():
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0, 0.0, 0.0],   # target 0: rank 0
                           [2.0, 2.0, 0.0, 0.0, 0.0, 0.0],   # target 1 tied with 0: rank 1
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],   # constant: rank 5 -> miss even at top-5
                           [0.0, 3.0, 2.0, 1.0, 4.0, 0.5]])  # target 5: 4 higher -> rank 4 -> top-5 hit
    targets = torch.tensor([0, 1, 2, 5])
    out = M.classification_metrics(logits, targets)
    assert out["top1"] == pytest.approx(25.0)
    assert out["top5"] == pytest.approx(75.0)
    # per class top-1 recall: class 0 -> 1, class 1 -> 0, class 2 -> 0, class 5 -> 0 (classes 3, 4 absent)
    assert out["mean_per_class_recall"] == pytest.approx(25.0)
    small = M.classification_metrics(torch.ones(3, 3), torch.tensor([0, 1, 2]))
    assert small == {"top1": 0.0, "mean_per_class_recall": 0.0}  # no top-5 with 3 classes


def test_default_similarity_is_the_kernels_op_and_agrees():
    from vladva_openclip.kernels import similarity  # noqa: F401  (the default path must import)

    gen = torch.Generator().manual_seed(2)
    images = torch.nn.functional.normalize(torch.randn(9, 16, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(25, 16, generator=gen), dim=-1)
    owner = torch.arange(25) % 9
    default = M.retrieval_metrics(images, texts, owner, tile_elements=40)
    assert default == M.retrieval_metrics(images, texts, owner, similarity=matmul)


def test_sugarcrepe_accuracy_orders_subsets_and_micro_averages():
    correct = {"add_obj": torch.tensor([True, False]), "swap_att": torch.tensor([True, True, True]),
               "swap_obj": torch.tensor([False]), "extra": torch.tensor([True])}
    out = M.sugarcrepe_accuracy(correct, order=("swap_obj", "swap_att", "add_obj"))
    assert list(out)[:4] == ["swap_obj", "swap_att", "add_obj", "extra"]
    assert out["swap_obj"] == 0.0 and out["add_obj"] == 50.0 and out["extra"] == 100.0
    assert out["swap"] == 75.0  # micro: 3 of 4 examples, not the mean of 100 and 0
    assert out["add"] == 50.0 and "replace" not in out


def test_score_level_rules_match_the_embedding_rules():
    """The rules on scores (what generative scoring uses) are the ones the embedding path applies."""
    for s in [(1.0, 0.2, 0.9, 1.0), (0.5, 0.6, 0.1, 0.9), (0.5, 0.1, 0.6, 0.9), (0.0, 1.0, 1.0, 0.0)]:
        hits = M.winoground_hits(*(torch.tensor([v]) for v in s))
        assert tuple(hits[k].item() for k in ("text", "image", "group")) == _wino(*s)
    itt = M.itt_hits(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([2.0, 0.5, 1.0]), torch.tensor([1.0, 0.5, 1.0]))
    assert itt["itt"].tolist() == [True, False, False] and itt["img_p2_neg"].tolist() == [True, False, False]
