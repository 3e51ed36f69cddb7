"""GEX (geometric ensemble influence): its formula against per-sample loops over the members,
the paper's identity with the influence function's bilinear form (small steps: linear losses),
pairwise columns, determinism. Its sign test is in test_estimators_sign_all.py (every
registered estimator)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr

from estimators.gex import GEX, _load_flat
from estimators.per_sample import per_sample_gradients


@pytest.fixture(scope="module")
def mlp_ctx(digits, kit):
    """A 15-16-3 tanh MLP after minibatch SGD (40 epochs) on 120 digits; 30 target rows."""
    x, y = digits["train_x"][:120], digits["train_y"][:120]
    factory, checkpoints = kit.train_mlp(x, y, seed=0)
    ctx = kit.make_context(factory, checkpoints, x, y, digits["test_x"][:30],
                           digits["test_y"][:30], weight_decay=1e-3)
    ctx.target_ids = None
    return ctx


def test_score_is_the_mean_product_of_loss_changes(mlp_ctx) -> None:
    """Reference: the module formula with one forward pass per sample and member."""
    est = GEX(members=4, steps_per_member=3)
    got = est.score(mlp_ctx)
    model = mlp_ctx.model_at(mlp_ctx.final).to(torch.float64)
    x, y = mlp_ctx.train_x.to(torch.float64), mlp_ctx.train_y

    def losses() -> tuple[np.ndarray, float]:
        with torch.no_grad():
            per = [float(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])) for i in range(len(y))]
            target = float(F.cross_entropy(model(mlp_ctx.target_x.to(torch.float64)),
                                           mlp_ctx.target_y, reduction="sum"))
        return np.array(per), target

    base, base_t = losses()
    score, self_inf = np.zeros(len(y)), np.zeros(len(y))
    for flat in est.ensemble(mlp_ctx):
        _load_flat(model, flat)
        per, target = losses()
        score += (per - base) * (target - base_t) / 4
        self_inf += (per - base) ** 2 / 4
    np.testing.assert_allclose(got.score, score, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(got.suspicion, self_inf, rtol=1e-9, atol=1e-16)
    np.testing.assert_array_equal(got.sample_ids, mlp_ctx.train_ids)


def test_small_steps_give_the_bilinear_form_of_the_ensemble_second_moment(mlp_ctx) -> None:
    """The paper's identity: with linear losses (here: small steps), GEX(z, V) equals
    g_z^T S g_V with S = (1/K) sum_k d_k d_k^T, d_k = theta_k - theta* (the influence function
    has S = H^{-1}, the Laplace approximation's covariance)."""
    est = GEX(members=8, steps_per_member=2, lr=1e-4)
    got = est.score(mlp_ctx).score
    model = mlp_ctx.model_at(mlp_ctx.final).to(torch.float64)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    deltas = torch.stack([flat - start for flat in est.ensemble(mlp_ctx)])  # (K, d)
    g_z = per_sample_gradients(model, mlp_ctx.train_x.to(torch.float64), mlp_ctx.train_y)
    g_v = per_sample_gradients(model, mlp_ctx.target_x.to(torch.float64),
                               mlp_ctx.target_y).sum(0)
    bilinear = ((g_z.to(torch.float64) @ deltas.T) @ (deltas @ g_v.to(torch.float64))
                / len(deltas)).numpy()
    assert pearsonr(got, bilinear)[0] > 0.999
    np.testing.assert_allclose(got, bilinear, rtol=0.05, atol=0.05 * np.abs(bilinear).max())


def test_pairwise_columns_sum_to_the_score(mlp_ctx, kit) -> None:
    kit.assert_pairwise_sums_to_score(GEX(members=3, steps_per_member=2), mlp_ctx, 30)


def test_deterministic_in_the_seed(mlp_ctx) -> None:
    first = GEX(members=3).score(mlp_ctx).score
    np.testing.assert_array_equal(first, GEX(members=3).score(mlp_ctx).score)
    mlp_ctx.seed, seed = 5, mlp_ctx.seed
    try:
        assert not np.allclose(first, GEX(members=3).score(mlp_ctx).score)
    finally:
        mlp_ctx.seed = seed


@pytest.mark.parametrize(("options", "message"), [
    ({"members": 1}, "members"), ({"steps_per_member": 0}, "steps_per_member"),
    ({"lr": 0.0}, "lr"), ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_options(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        GEX(**options)
