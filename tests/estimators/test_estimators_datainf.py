"""DataInf (spec section 4): the streamed estimator equals the formula computed densely, the sign
tests of section 11, pairwise consistency, layer grouping, refusal of projected gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch import nn

from estimators import InMemoryGradients
from estimators.datainf import DataInf, parameter_layers
from estimators.influence import ExactInfluence

LAM = 1e-2
COPIES = 3


def loo_deltas(model, x, y, tx, ty, lam, removed) -> np.ndarray:
    """``U(theta_without_i) - U(theta)`` (U = summed target CE) by warm-started L-BFGS on
    ``(1/n) sum_{j != i} l_j + (lam/2)||theta||^2`` (n fixed, so removal = weight -1/n)."""
    n = len(y)

    def target_loss(m: nn.Module) -> float:
        with torch.no_grad():
            return F.cross_entropy(m(tx), ty, reduction="sum").item()

    base = target_loss(model)
    deltas = []
    for i in removed:
        m = copy.deepcopy(model)
        weights = torch.ones(n, dtype=torch.float64)
        weights[i] = 0
        opt = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=1e-16, history_size=30,
                                line_search_fn="strong_wolfe")

        def closure(m=m, opt=opt, weights=weights) -> torch.Tensor:
            opt.zero_grad()
            penalty = sum((p * p).sum() for p in m.parameters())
            loss = (weights * F.cross_entropy(m(x), y, reduction="none")).sum() / n
            loss = loss + lam / 2 * penalty
            loss.backward()
            return loss

        opt.step(closure)
        deltas.append(target_loss(m) - base)
    return np.asarray(deltas)


@pytest.fixture(scope="module")
def logistic(digits, kit):
    """L2 logistic regression at its optimum, with LOO truth for 60 removed samples."""
    x, y = torch.as_tensor(digits["train_x"]), torch.as_tensor(digits["train_y"])
    tx, ty = torch.as_tensor(digits["test_x"]), torch.as_tensor(digits["test_y"])
    model = kit.fit_lbfgs(kit.linear_factory()(), x, y, LAM)
    ctx = kit.make_context(kit.linear_factory(), [kit.snapshot(model, 0, 1, 1.0)],
                           digits["train_x"], digits["train_y"], digits["test_x"],
                           digits["test_y"], LAM)
    removed = np.random.default_rng(1).choice(len(y), size=60, replace=False)
    return {"ctx": ctx, "removed": removed,
            "delta": loo_deltas(model, x, y, tx, ty, LAM, removed)}


@pytest.fixture(scope="module")
def mlp(digits, kit):
    x, y = torch.as_tensor(digits["train_x"]), torch.as_tensor(digits["train_y"])
    torch.manual_seed(0)
    model = kit.fit_lbfgs(kit.mlp_factory()(), x, y, 1e-3)
    return kit.make_context(kit.mlp_factory(), [kit.snapshot(model, 0, 1, 1.0)],
                            digits["train_x"], digits["train_y"], digits["test_x"][:40],
                            digits["test_y"][:40], 1e-3)


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


def test_duplicated_mislabeled_sample_scores_negative(digits, kit) -> None:
    x, y = digits["train_x"], digits["train_y"]
    threes = np.flatnonzero(y == 0)
    typical = threes[np.argmin(((x[threes] - x[threes].mean(0)) ** 2).sum(1))]
    x = np.concatenate([np.delete(x, typical, 0), np.repeat(x[typical : typical + 1], COPIES, 0)])
    y = np.concatenate([np.delete(y, typical), np.full(COPIES, 1)])
    model = kit.fit_lbfgs(kit.linear_factory()(), torch.as_tensor(x), torch.as_tensor(y), LAM)
    ctx = kit.make_context(kit.linear_factory(), [kit.snapshot(model, 0, 1, 1.0)], x, y,
                           digits["test_x"], digits["test_y"], LAM)
    attribution = DataInf().score(ctx)
    bad = np.isin(attribution.sample_ids, ctx.train_ids[-COPIES:])
    assert (attribution.score[bad] < 0).all(), attribution.score[bad]
    ranking = np.argsort(-attribution.suspicion, kind="stable")
    assert np.isin(ranking[: COPIES + 3], np.flatnonzero(bad)).sum() == COPIES


def test_pairwise_columns_sum_to_the_summed_target_score(mlp) -> None:
    estimator = DataInf()
    train_ids, target_ids, matrix = estimator.pairwise(mlp)
    summed = estimator.score(mlp)
    assert matrix.shape == (len(mlp.train_ids), 40)
    np.testing.assert_array_equal(target_ids, np.arange(40))
    np.testing.assert_array_equal(train_ids, summed.sample_ids)
    np.testing.assert_allclose(matrix.sum(axis=1), summed.score, rtol=1e-8, atol=1e-10)


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
