"""Transferability estimators against independent references: direct evidence, hand-computed LEEP/NCE, scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sklearn.covariance as sklearn_covariance
import torch
from torch.distributions import MultivariateNormal

from lightning_transfer.functional.transferability import (
    hscore,
    ledoit_wolf_shrinkage,
    leep,
    logme,
    logme_evidence,
    nce,
)


def _direct_evidence(f: torch.Tensor, t: torch.Tensor, alpha: float, beta: float) -> float:
    """log N(t | 0, β⁻¹ I + α⁻¹ F Fᵀ) / N: the marginal likelihood from its definition (w integrated out)."""
    n = f.shape[0]
    cov = torch.eye(n, dtype=torch.float64) / beta + f @ f.T / alpha
    return float(MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(t)) / n


@pytest.mark.parametrize("n, d", [(40, 6), (12, 20)])  # more examples than features, and fewer (few-shot)
def test_logme_evidence_is_the_marginal_likelihood_at_its_maximum(n, d):
    g = torch.Generator().manual_seed(n)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = (f[:, 0] + 0.7 * torch.randn(n, generator=g, dtype=torch.float64) > 0).double()
    evidence, alpha, beta = logme_evidence(f, t)
    assert evidence == pytest.approx(_direct_evidence(f, t, alpha, beta), abs=1e-9)
    best = _direct_evidence(f, t, alpha, beta)
    for scale in (0.8, 0.95, 1.05, 1.25):  # the fixed point is a maximum in α and in β
        assert _direct_evidence(f, t, alpha * scale, beta) < best
        assert _direct_evidence(f, t, alpha, beta * scale) < best


def test_logme_is_the_mean_class_evidence_and_ignores_class_names():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(60, 5, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    per_class = []
    for c in range(3):
        t = (y == c).double()
        _, alpha, beta = logme_evidence(f, t)
        per_class.append(_direct_evidence(f.double(), t, alpha, beta))
    assert logme(f, y) == pytest.approx(sum(per_class) / 3, abs=1e-9)
    renamed = torch.tensor([2, 0, 1])[y]  # a permutation of the class ids
    assert logme(f, renamed) == pytest.approx(logme(f, y), abs=1e-9)
    order = torch.randperm(60, generator=g)  # and of the examples
    assert logme(f[order], y[order]) == pytest.approx(logme(f, y), abs=1e-9)


def test_logme_and_hscore_prefer_separable_labels():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(4).repeat(25)
    f = torch.randn(100, 8, generator=g) + 3 * torch.eye(4, 8)[y]  # class means apart
    shuffled = y[torch.randperm(100, generator=g)]
    assert logme(f, y) > logme(f, shuffled) + 0.1
    assert hscore(f, y) > hscore(f, shuffled) + 1.0


def test_leep_matches_a_hand_computed_example():
    theta = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    # P(y, z) = 1/3 Σᵢ θᵢz [yᵢ = y]: row y=0: (0.8, 0.2)/3, row y=1: (0.4+0.1, 0.6+0.9)/3 = (0.5, 1.5)/3
    # P(z) = (1.3, 1.7)/3, so P(0|z) = (0.8/1.3, 0.2/1.7) = (8/13, 2/17), P(1|z) = (5/13, 15/17)
    # example 1 (y=0): 0.8·8/13 + 0.2·2/17; example 2 (y=1): 0.4·5/13 + 0.6·15/17; example 3: 0.1·5/13 + 0.9·15/17
    eep = [0.8 * 8 / 13 + 0.2 * 2 / 17, 0.4 * 5 / 13 + 0.6 * 15 / 17, 0.1 * 5 / 13 + 0.9 * 15 / 17]
    expected = sum(math.log(p) for p in eep) / 3  # ≈ (ln 0.5158 + ln 0.6833 + ln 0.8326) / 3
    assert leep(theta, y) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(-0.4087, abs=1e-4)


def test_leep_is_at_most_zero_and_zero_for_a_deterministic_mapping():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(50, 7, generator=g), 1)
    y = torch.randint(0, 3, (50,), generator=g)
    assert leep(probs, y) < 0
    z = torch.randint(0, 7, (50,), generator=g)
    mapping = torch.tensor([0, 1, 2, 0, 1, 2, 1])  # each source class -> one target class
    assert leep(torch.eye(7)[z], mapping[z]) == pytest.approx(0.0, abs=1e-12)
    assert nce(z, mapping[z]) == pytest.approx(0.0, abs=1e-12)


def test_nce_matches_a_hand_computed_example():
    z = torch.tensor([0, 0, 1, 1, 1])
    y = torch.tensor([0, 1, 1, 1, 0])
    # P(y, z): (0,0)=1/5, (1,0)=1/5, (1,1)=2/5, (0,1)=1/5; P(y|z=0) = 1/2, 1/2; P(1|z=1) = 2/3, P(0|z=1) = 1/3
    expected = 1 / 5 * math.log(1 / 2) * 2 + 2 / 5 * math.log(2 / 3) + 1 / 5 * math.log(1 / 3)
    assert nce(z + 10, y) == pytest.approx(expected, abs=1e-12)  # source ids need not be 0..Z-1


def _hscore_reference(f: np.ndarray, y: np.ndarray) -> float:
    """tr(cov(f)⁻¹ cov(E[f|y])) with numpy: class means by loop, biased covariances, a plain inverse."""
    cov_f = np.cov(f, rowvar=False, bias=True)
    g = np.empty_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    cov_g = np.cov(g, rowvar=False, bias=True)
    return float(np.trace(np.linalg.inv(cov_f) @ cov_g))


def test_hscore_matches_numpy_and_is_invariant_to_invertible_maps():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(80, 5))
    y = rng.integers(0, 4, size=80)
    ft, yt = torch.from_numpy(f), torch.from_numpy(y)
    assert hscore(ft, yt, shrinkage=None) == pytest.approx(_hscore_reference(f, y), rel=1e-9)
    mix = torch.from_numpy(rng.normal(size=(5, 5))) + 3 * torch.eye(5, dtype=torch.float64)
    assert hscore(ft @ mix + 7.0, yt, shrinkage=None) == pytest.approx(hscore(ft, yt, shrinkage=None), rel=1e-7)
    assert 0 <= hscore(ft, yt, shrinkage=None) <= 3 + 1e-9  # at most C - 1


@pytest.mark.parametrize("n, d", [(60, 12), (20, 40)])  # d > n: the Woodbury path
def test_regularized_hscore_uses_scikit_learns_ledoit_wolf_covariance(n, d):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    mine = ledoit_wolf_shrinkage(torch.from_numpy(x))
    assert 0 < mine < 1
    assert mine == pytest.approx(sklearn_covariance.ledoit_wolf_shrinkage(x), rel=1e-9)
    cov = sklearn_covariance.LedoitWolf().fit(x).covariance_  # the regularized H-score uses that covariance
    xc = x - x.mean(0)
    g = np.empty_like(xc)
    y = rng.integers(0, 3, size=n)
    for c in np.unique(y):
        g[y == c] = xc[y == c].mean(0)
    expected = float(np.trace(np.linalg.inv(cov) @ (g.T @ g / n)))
    assert hscore(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("call, message", [
    (lambda: logme(torch.randn(5, 3), torch.tensor([0, 1, 0, 1])), "5 rows but labels have 4"),
    (lambda: logme(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), "at least 2 classes"),
    (lambda: logme(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), torch.tensor([0, 1])), "non-finite"),
    (lambda: hscore(torch.randn(4, 3), torch.tensor([0.0, 1.0, 0.0, 1.0])), "integer"),
    (lambda: hscore(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), shrinkage=2.0), "shrinkage"),
    (lambda: leep(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), "softmax"),
    (lambda: leep(torch.full((4, 3), 0.5), torch.tensor([0, 1, 0, 1])), "rows summing to 1"),
    (lambda: nce(torch.rand(4), torch.tensor([0, 1, 0, 1])), "argmax"),
    (lambda: logme(torch.randn(4, 3, 2), torch.tensor([0, 1, 0, 1])), "pool"),
])
def test_bad_inputs_get_a_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
