"""DataInf (spec section 4): the streamed estimator equals the formula computed densely, the sign
tests of section 11, pairwise consistency, layer grouping, refusal of projected gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

from estimators import InMemoryGradients
from estimators.datainf import DataInf, parameter_layers
from estimators.influence import ExactInfluence

LAM = 1e-2
COPIES = 3


@pytest.fixture(scope="module")
def logistic(loo_case):
    """L2 logistic regression at its optimum, with LOO truth for 60 removed samples."""
    return loo_case(60, solver="torch", lam=LAM)


@pytest.fixture(scope="module")
def mlp(lbfgs_mlp):
    return lbfgs_mlp


def test_equals_the_dense_formula(mlp) -> None:
    """15-16-3 MLP: layers 0.{weight,bias} (256 columns) and 2.{weight,bias} (51 columns)."""
    g = mlp.gradients.train_matrix(0)
    g_v = mlp.gradients.target(0)
    n = g.shape[0]
    score = torch.zeros(n, dtype=torch.float64)
    suspicion = torch.zeros(n, dtype=torch.float64)
    for cols in (slice(0, 256), slice(256, 307)):
        gl, vl = g[:, cols], g_v[cols]
        lam = 0.1 * (gl**2).sum(1).mean() / gl.shape[1] + mlp.weight_decay
        norms = (gl**2).sum(1)
        h = sum(vl - (vl @ gl[i]) / (lam + norms[i]) * gl[i] for i in range(n)) / (n * lam)
        score += gl @ h
        cross = gl @ gl.T  # (k, i): g_k . g_i
        suspicion += (n * norms - (cross**2 / (lam + norms)[None, :]).sum(1)) / (n * lam)

    got = DataInf().score(mlp)
    np.testing.assert_array_equal(got.sample_ids, mlp.train_ids)
    np.testing.assert_allclose(got.score, score.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.suspicion, suspicion.numpy(), rtol=1e-9)
    assert (got.suspicion > 0).all()


def test_layers_follow_owning_modules() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(3))
            self.first = nn.Linear(4, 5)
            self.norm = nn.LayerNorm(5)
            self.head = nn.Linear(5, 3)
            self.head.bias.requires_grad_(False)

    assert parameter_layers(Net()) == [
        ("", slice(0, 3)),
        ("first", slice(3, 28)),
        ("norm", slice(28, 38)),
        ("head", slice(38, 53)),
    ]


def test_positive_spearman_with_leave_one_out(logistic, capsys) -> None:
    ctx = logistic["ctx"]
    attribution = DataInf().score(ctx)
    score = attribution.score[logistic["removed"]]
    exact = ExactInfluence(curvature="ggn").score(ctx)
    rho = spearmanr(score, logistic["delta"])[0]
    with capsys.disabled():
        print(f"\n[datainf vs LOO] Spearman={rho:.4f}, "
              f"Pearson={pearsonr(score, logistic['delta'])[0]:.4f}; vs if_exact(ggn) "
              f"Pearson={pearsonr(attribution.score, exact.score)[0]:.4f}")
    assert rho > 0.5


def test_duplicated_mislabeled_sample_scores_negative(mislabeled_case) -> None:
    ctx = mislabeled_case("linear", COPIES, LAM)
    attribution = DataInf().score(ctx)
    bad = np.isin(attribution.sample_ids, ctx.train_ids[-COPIES:])
    assert (attribution.score[bad] < 0).all(), attribution.score[bad]
    ranking = np.argsort(-attribution.suspicion, kind="stable")
    assert np.isin(ranking[: COPIES + 3], np.flatnonzero(bad)).sum() == COPIES


def test_pairwise_columns_sum_to_the_summed_target_score(mlp, kit) -> None:
    kit.assert_pairwise_sums_to_score(DataInf(), mlp, n_targets=40)


def test_suspicion_limit_and_projected_gradients(mlp) -> None:
    full = DataInf().score(mlp)
    limited = DataInf(suspicion_max_dim=100).score(mlp)  # the first layer has 256 parameters
    assert limited.suspicion is None
    np.testing.assert_allclose(limited.score, full.score, rtol=1e-12)

    projected = copy.copy(mlp)
    g = mlp.gradients.train_matrix(0)
    projected.gradients = InMemoryGradients(mlp.train_ids, [g[:, :64]],
                                            [mlp.gradients.target(0)[:64]])
    with pytest.raises(ValueError, match="unprojected"):
        DataInf().score(projected)
