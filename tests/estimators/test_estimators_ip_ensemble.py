"""IP Ensemble (spec section 2): reduces to IP at p_max = 0, deterministic in the seed, masks as
specified, positive Spearman with actual leave-one-out retraining (spec section 11.2)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from estimators.inner_product import InnerProduct
from estimators.ip_ensemble import IPEnsemble, dropout_masks, norm_and_bias_parameters

LAM = 1e-2
N_REMOVED = 60


@pytest.fixture(scope="module")
def mlp_ctx(digits, kit):
    """A 15-16-3 tanh MLP after 3 SGD epochs on 120 digits, in-memory IP gradients, 25 targets."""
    x = torch.as_tensor(digits["train_x"][:120])
    y = torch.as_tensor(digits["train_y"][:120])
    torch.manual_seed(0)
    model = kit.mlp_factory()()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        for start in range(0, 120, 20):
            opt.zero_grad()
            rows = slice(start, start + 20)
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
    ckpt = kit.snapshot(model, 0, 18, 0.1)
    return kit.make_context(kit.mlp_factory(), [ckpt], digits["train_x"][:120],
                            digits["train_y"][:120], digits["test_x"][:25], digits["test_y"][:25],
                            weight_decay=1e-3)


def test_zero_dropout_equals_ip(mlp_ctx) -> None:
    ip = InnerProduct().score(mlp_ctx)
    ens = IPEnsemble(k=3, p_max=0.0).score(mlp_ctx)
    np.testing.assert_array_equal(ens.sample_ids, ip.sample_ids)
    np.testing.assert_allclose(ens.score, ip.score, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ens.suspicion, ip.suspicion, rtol=1e-10, atol=1e-14)
    _, _, ip_pairs = InnerProduct().pairwise(mlp_ctx)
    train_ids, target_ids, pairs = IPEnsemble(k=2, p_max=0.0).pairwise(mlp_ctx)
    np.testing.assert_array_equal(train_ids, ip.sample_ids)
    assert len(target_ids) == 25
    np.testing.assert_allclose(pairs, ip_pairs, rtol=1e-10, atol=1e-14)


def test_deterministic_in_the_seed_and_differs_from_ip(mlp_ctx) -> None:
    a = IPEnsemble(k=4).score(mlp_ctx)
    np.testing.assert_array_equal(a.score, IPEnsemble(k=4).score(mlp_ctx).score)
    other = IPEnsemble(k=4).score(replace(mlp_ctx, seed=1))
    assert not np.allclose(a.score, other.score)
    ip = InnerProduct().score(mlp_ctx).score
    single = IPEnsemble(k=1, p_max=0.05).score(mlp_ctx).score
    assert not np.allclose(single, ip, rtol=1e-6)
    # a small perturbation of IP, not a different estimator
    assert np.corrcoef(single, ip)[0, 1] > 0.9
    rescaled = IPEnsemble(k=1, p_max=0.05, rescale=True).score(mlp_ctx).score
    assert not np.allclose(rescaled, single)


def test_pairwise_columns_sum_to_the_score(mlp_ctx) -> None:
    estimator = IPEnsemble(k=2, p_max=0.05)
    train_ids, _, matrix = estimator.pairwise(mlp_ctx)
    summed = estimator.score(mlp_ctx)
    np.testing.assert_array_equal(train_ids, summed.sample_ids)
    np.testing.assert_allclose(matrix.sum(axis=1), summed.score, rtol=1e-9, atol=1e-12)


def test_masks(kit) -> None:
    model = nn.Sequential(nn.Linear(40, 50), nn.LayerNorm(50), nn.Linear(50, 3, bias=False))
    assert norm_and_bias_parameters(model) == {"0.bias", "1.weight", "1.bias"}
    p, masks = dropout_masks(model, seed=0, member=2, p_max=0.3)
    p2, masks2 = dropout_masks(model, seed=0, member=2, p_max=0.3)
    assert p == p2 and 0 < p < 0.3
    assert list(masks) == [name for name, _ in model.named_parameters()]
    kept = torch.cat([m.reshape(-1) for m in masks.values()]).double().mean().item()
    assert abs((1 - kept) - p) < 0.03
    assert all(torch.equal(masks[k], masks2[k]) for k in masks)
    _, zero = dropout_masks(model, seed=0, member=2, p_max=0.0)
    assert all(bool(m.all()) for m in zero.values())


@pytest.mark.filterwarnings("ignore:ip_ensemble member")
def test_exclude_norm_and_bias_leaves_biases(mlp_ctx) -> None:
    estimator = IPEnsemble(k=2, p_max=0.5, exclude_norm_and_bias=True)
    base = mlp_ctx.model_at(mlp_ctx.final)
    for member in estimator._members(mlp_ctx):
        for (name, p), (_, p0) in zip(member.named_parameters(), base.named_parameters(),
                                      strict=True):
            assert torch.equal(p, p0) == name.endswith("bias"), name
    excluded = estimator.score(mlp_ctx).score
    everything = IPEnsemble(k=2, p_max=0.5).score(mlp_ctx).score
    assert not np.allclose(excluded, everything)
    assert len(estimator.diagnostics["p"]) == 2
    assert all(0 < f < 0.5 for f in estimator.diagnostics["masked_fraction"])


def test_large_dropout_warns(mlp_ctx) -> None:
    with pytest.warns(UserWarning, match="target accuracy"):
        IPEnsemble(k=2, p_max=0.9).score(mlp_ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IPEnsemble(k=2, p_max=0.0).score(mlp_ctx)


def test_errors() -> None:
    with pytest.raises(ValueError, match="k"):
        IPEnsemble(k=0)
    with pytest.raises(ValueError, match="p_max"):
        IPEnsemble(p_max=1.0)


def test_positive_spearman_with_leave_one_out(loo_case, capsys) -> None:
    """L2 logistic regression fitted by L-BFGS (numpy/scipy), n=300, 60 LOO retrains."""
    case = loo_case(N_REMOVED, lam=LAM)
    ctx, removed, delta, n = case["ctx"], case["removed"], case["delta"], case["n"]
    ens = IPEnsemble().score(ctx).score[removed]
    ip = InnerProduct().score(ctx).score[removed]
    rho, rho_ip = spearmanr(ens, delta)[0], spearmanr(ip, delta)[0]
    with capsys.disabled():
        print(f"\n[ip_ensemble vs LOO] n={n}, removed={N_REMOVED}: Spearman {rho:+.3f} "
              f"(IP {rho_ip:+.3f})")
    assert rho > 0.5
