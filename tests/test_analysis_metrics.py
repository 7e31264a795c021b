"""The analysis metrics against hand-computed values (and scipy where it has the same statistic)."""
import math

import pytest
import torch

from vladva_openclip.analysis.metrics import (
    components_for,
    cumulative_explained_variance,
    distribution_entropy,
    entropy_from_logits,
    explained_variance_ratio,
    fractional_ranks,
    permutation_pvalue,
    spearman,
)
from vladva_openclip.analysis.selection import SCORES, get_score


# ---- entropy ---------------------------------------------------------------------------------------------------
def test_entropy_of_known_distributions():
    # uniform over V: log V
    assert entropy_from_logits(torch.zeros(7)).item() == pytest.approx(math.log(7), abs=1e-6)
    # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25])) + 3.0  # shift-invariant
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    # a -inf logit has zero probability and contributes nothing (no NaN)
    masked = torch.tensor([0.0, 0.0, float("-inf")])
    assert entropy_from_logits(masked).item() == pytest.approx(math.log(2), abs=1e-6)
    # one-hot: 0; batched shapes are kept; bf16 input is computed in fp32
    assert entropy_from_logits(torch.tensor([[100.0, 0.0, 0.0]])).shape == (1,)
    assert entropy_from_logits(torch.tensor([1e4, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_from_logits(torch.zeros(2, 3, 5, dtype=torch.bfloat16)).dtype == torch.float32


def test_distribution_entropy_renormalises_and_handles_zeros():
    w = torch.tensor([[0.2, 0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    h = distribution_entropy(w)
    assert h[0].item() == pytest.approx(math.log(2), abs=1e-6)  # mass 0.4 renormalised to (1/2, 1/2)
    assert h[1].item() == 0.0  # no mass: 0, not NaN
    p = torch.tensor([0.5, 0.25, 0.25])
    assert distribution_entropy(p, normalize=False).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)


# ---- explained variance / effective rank -----------------------------------------------------------------------
def test_explained_variance_of_known_singular_values():
    # Centred rows whose covariance has eigenvalues proportional to 9, 4, 1 (orthogonal columns scaled 3, 2, 1).
    base = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    x = base * torch.tensor([3.0, 2.0, 1.0])
    ratios = explained_variance_ratio(x)
    assert torch.allclose(ratios[:3], torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64) / 14, atol=1e-12)
    cev = cumulative_explained_variance(x)
    assert cev[-1].item() == pytest.approx(1.0)
    assert components_for(cev, 0.5) == 1  # 9/14 = 0.64
    assert components_for(cev, 0.9) == 2  # 13/14 = 0.93
    assert components_for(cev, 0.99) == 3
    # a constant shift of every row does not change PCA (centred) ...
    assert torch.allclose(explained_variance_ratio(x + 5.0), ratios)
    # ... but does change the uncentred second moment
    assert not torch.allclose(explained_variance_ratio(x + 5.0, center=False), ratios)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_effective_rank_of_a_matrix_of_known_rank(rank):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(40, rank, generator=gen) @ torch.randn(rank, 16, generator=gen)
    cev = cumulative_explained_variance(x)
    assert cev[rank - 1].item() == pytest.approx(1.0, abs=1e-9)  # rank components explain everything
    assert components_for(cev, 0.99) <= rank
    assert components_for(cev, 1.0) == rank
    if rank > 1:
        assert cev[rank - 2].item() < 1.0 - 1e-6


def test_effective_rank_edge_cases():
    assert components_for(cumulative_explained_variance(torch.ones(5, 4)), 0.9) == 0  # no variance at all
    with pytest.raises(ValueError, match="N >= 2"):
        explained_variance_ratio(torch.ones(1, 4))
    with pytest.raises(ValueError, match="fraction"):
        components_for(torch.tensor([1.0]), 1.5)


# ---- ranks and correlation -------------------------------------------------------------------------------------
def test_fractional_ranks_average_ties():
    assert fractional_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_hand_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); ranks (1,2,3,4,5) vs (2,1,4,3,5): sum d^2 = 4 -> 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant side: undefined


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randint(0, 6, (30,), generator=gen).tolist()  # many ties
        y = (torch.tensor(x) + torch.randint(0, 4, (30,), generator=gen)).tolist()
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_permutation_pvalue():
    # n = 5, a perfect ranking: |rho| = 1 for 2 of the 120 orderings, so p ~ 2/120
    p = permutation_pvalue([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], permutations=20000)
    assert p == pytest.approx(2 / 120, abs=0.004)
    assert permutation_pvalue([1, 2, 3], [1, 2, 3], seed=3) == permutation_pvalue([1, 2, 3], [1, 2, 3], seed=3)
    gen = torch.Generator().manual_seed(1)
    noise = torch.rand(50, generator=gen).tolist()
    assert permutation_pvalue(list(range(50)), noise, permutations=2000) > 0.01
    stats = pytest.importorskip("scipy.stats")
    x = list(range(20))
    y = [v + 6 * ((v * 7) % 5) for v in x]
    assert permutation_pvalue(x, y, permutations=20000) == pytest.approx(stats.spearmanr(x, y).pvalue, abs=0.01)


# ---- label-free score ------------------------------------------------------------------------------------------
def test_label_free_score_hand_case():
    score = get_score("entropy+rank")
    cols = {"image_entropy": [1.0, 2.0, 3.0], "text_entropy": [3.0, 2.0, 1.0],
            "image_k90": [5, 5, 9], "text_k90": [1, 2, 3]}
    # normalised ranks: image entropy (0, .5, 1), text entropy (1, .5, 0), image k90 (.25, .25, 1), text (0, .5, 1)
    assert score(cols) == pytest.approx([(0 + 1 + 0.25 + 0) / 4, (0.5 + 0.5 + 0.25 + 0.5) / 4, (1 + 0 + 1 + 1) / 4])
    assert score({k: v[:1] for k, v in cols.items()}) == [1.0]
    assert {"entropy+rank", "entropy", "rank"} <= set(SCORES)
    with pytest.raises(ValueError, match="unknown label-free score"):
        get_score("bleu")
