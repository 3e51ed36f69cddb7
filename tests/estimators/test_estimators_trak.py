"""TRAK (spec section 5): sign and agreement with leave-one-out, pairwise consistency, seeding,
and ensembles over independently trained models.

The leave-one-out case is the one of ``test_estimators_loo.py``: L2-regularized multinomial
logistic regression on digits 3/5/8 (n=300, 15 PCA features, d=48, lam=1e-2), ground truth
``Delta_i = U(theta_without_i) - U(theta)`` (U the summed test cross-entropy) from numpy + scipy
L-BFGS, independent of torch. There d=48 <= k_eff, so TRAK runs on exact gradients unless k is
set below 48.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from estimators import make_estimator
from estimators.per_sample import per_sample_gradients
from estimators.targets import Target
from estimators.trak import TRAK, margin_gradients, margins

LAM = 1e-2
N_REMOVED = 60
COPIES = 3


@pytest.fixture(scope="module")
def convex(loo_case):
    """The fitted model's scoring context, a 20-target context and the LOO truth."""
    return loo_case(N_REMOVED, lam=LAM)


@pytest.fixture(scope="module")
def mlp(digits, kit):
    """Two independently trained MLPs (d=307 > k_eff=150, so TRAK projects)."""
    x, y = digits["train_x"], digits["train_y"]
    factory, first = kit.train_mlp(x, y, seed=0)
    _, second = kit.train_mlp(x, y, seed=1)
    ctx = kit.make_context(factory, first, x, y, digits["test_x"][:40], digits["test_y"][:40])
    return {"ctx": ctx, "second": second}


def _at_removed(convex, attribution) -> np.ndarray:
    position = {sid: k for k, sid in enumerate(attribution.sample_ids)}
    return attribution.score[[position[sid] for sid in convex["ctx"].train_ids[convex["removed"]]]]


@pytest.mark.parametrize("options", [{}, {"k": 24}, {"k": 24, "kind": "gaussian"}])
def test_positive_spearman_with_leave_one_out(convex, options, capsys) -> None:
    estimator = TRAK(**options)
    score = _at_removed(convex, estimator.score(convex["ctx"]))
    rho = spearmanr(score, convex["delta"])[0]
    member = estimator.metadata["members"][0]
    with capsys.disabled():
        print(
            f"\n[trak {options} vs LOO] k={member['k']} projected={member['projected']}: "
            f"Spearman={rho:.3f}"
        )
    assert rho > 0.3


@pytest.mark.parametrize("model_kind", ["linear", "mlp"])
def test_mislabeled_duplicates_score_negative(mislabeled_case, model_kind, capsys) -> None:
    """The most typical '3' replaced by COPIES copies labelled '5' must be harmful to the test
    margin, and rank among the most suspect (TRAK self-influence)."""
    ctx = mislabeled_case(model_kind, COPIES, 0.0)
    attribution = TRAK().score(ctx)
    bad = np.isin(attribution.sample_ids, ctx.train_ids[-COPIES:])
    ranking = np.argsort(-attribution.suspicion, kind="stable")
    ranks = np.flatnonzero(bad[ranking])
    with capsys.disabled():
        print(
            f"\n[trak {model_kind}] duplicated mislabeled scores {attribution.score[bad]}, "
            f"suspicion ranks {ranks}"
        )
    assert (attribution.score[bad] < 0).all()
    assert ranks.max() < 20  # top ~6% (leverage is shared among the copies)


@pytest.mark.parametrize("options", [{}, {"k": 24}, {"checkpoints": "all", "k": 64},
                                     {"kind": "factorized", "k_in": 8, "k_out": 3}])
def test_pairwise_columns_sum_to_the_summed_score(convex, mlp, options) -> None:
    for ctx in (convex["few"], mlp["ctx"]):
        estimator = TRAK(**options)
        summed = estimator.score(ctx)
        train_ids, target_ids, matrix = estimator.pairwise(ctx)
        assert matrix.shape == (len(ctx.train_ids), len(ctx.target_y))
        assert np.array_equal(train_ids, summed.sample_ids)
        assert np.array_equal(target_ids, np.arange(len(ctx.target_y)))
        np.testing.assert_allclose(
            matrix.sum(axis=1), summed.score, rtol=1e-8, atol=1e-10 * np.abs(summed.score).max()
        )


def test_deterministic_in_the_seed(mlp) -> None:
    ctx = mlp["ctx"]
    estimator = TRAK(k=64)
    first = estimator.score(ctx)
    assert estimator.metadata["members"][0]["projected"]
    again = TRAK(k=64).score(ctx)
    assert np.array_equal(first.score, again.score)
    assert np.array_equal(first.suspicion, again.suspicion)
    other = TRAK(k=64).score(dataclasses.replace(ctx, seed=1))
    assert not np.allclose(first.score, other.score)
    # another seed is another random projection of the same features: still correlated (over
    # the 10 pairs of seeds 0-4 with the counter-hash P: Spearman 0.48 to 0.61)
    assert spearmanr(first.score, other.score)[0] > 0.4


def _correct_class_probability(ctx, checkpoint) -> np.ndarray:
    with torch.no_grad():
        probs = torch.softmax(ctx.model_at(checkpoint)(ctx.train_x), dim=1)
    return probs[torch.arange(len(ctx.train_y)), ctx.train_y].numpy()


def test_ensemble_averages_tau_and_q_separately(digits, kit) -> None:
    """Two linear models from different initial points and SGD orders: exact features (d=48),
    so single-model runs use the same features as the ensemble; tau = mean tau_m * mean Q_m."""
    x, y = digits["train_x"], digits["train_y"]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = kit.linear_factory()()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=1e-2)
        gen = torch.Generator().manual_seed(seed)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(15):
            for batch in torch.randperm(len(y), generator=gen).split(32):
                opt.zero_grad()
                F.cross_entropy(model(tx[batch]), ty[batch]).backward()
                opt.step()
        models.append([kit.snapshot(model, index=0, step=1, lr=0.2)])
    ctx = kit.make_context(
        kit.linear_factory(), models[0], x, y, digits["test_x"], digits["test_y"]
    )
    ensemble_ctx = dataclasses.replace(ctx, extra_models=[models[1]])
    estimator = TRAK()
    assert estimator.needs.models and estimator.needs.model
    ensemble = estimator.score(ensemble_ctx)
    assert [m["model_id"] for m in estimator.metadata["members"]] == [0, 1]

    taus, qs = [], []
    for checkpoints in models:
        single = TRAK().score(dataclasses.replace(ctx, checkpoints=checkpoints))
        q = 1 - _correct_class_probability(ctx, checkpoints[-1])
        taus.append(single.score / q)
        qs.append(q)
    expected = np.mean(taus, axis=0) * np.mean(qs, axis=0)
    np.testing.assert_allclose(ensemble.score, expected, rtol=1e-6, atol=1e-9)
    assert not np.allclose(ensemble.score, taus[0] * qs[0], rtol=1e-3)


def test_projected_ensemble_and_all_checkpoints(mlp) -> None:
    """Each trained model gets its own projection (model_id); checkpoints of a model share it."""
    ctx = dataclasses.replace(mlp["ctx"], extra_models=[mlp["second"]])
    estimator = TRAK(k=64, checkpoints="all")
    assert estimator.needs.checkpoints == "all"
    attribution = estimator.score(ctx)
    members = estimator.metadata["members"]
    assert [(m["model_id"], m["checkpoint"]) for m in members] == [
        (model, ckpt) for model in (0, 1) for ckpt in range(4)
    ]
    projections = {m["model_id"]: m["projector"] for m in members}
    assert projections[0]["model_id"] == 0 and projections[1]["model_id"] == 1
    assert all(m["projector"] == projections[m["model_id"]] for m in members)
    assert np.isfinite(attribution.score).all() and (attribution.suspicion >= 0).all()
    single = TRAK(k=64).score(mlp["ctx"])
    assert spearmanr(attribution.score, single.score)[0] > 0.5


def test_margin_and_its_gradient(convex) -> None:
    """margin = log(p / (1 - p)) and grad loss = -(1 - p) grad margin, row by row."""
    ctx, model = convex["ctx"], convex["model"]
    logits = model(ctx.train_x).detach()
    p = torch.softmax(logits, dim=1)[torch.arange(len(ctx.train_y)), ctx.train_y]
    torch.testing.assert_close(margins(logits, ctx.train_y), torch.log(p / (1 - p)))
    grads = margin_gradients(model, ctx.train_x, ctx.train_y, chunk_size=7)
    loss_grads = per_sample_gradients(model, ctx.train_x, ctx.train_y)
    torch.testing.assert_close(loss_grads, -(1 - p).unsqueeze(1) * grads)
    binary = torch.tensor([[0.3], [-1.2]], dtype=torch.float64)
    torch.testing.assert_close(
        margins(binary, torch.tensor([1, 0])), torch.tensor([0.3, 1.2], dtype=torch.float64)
    )


class _NamedLoss(Target):
    """The summed cross-entropy, but not ``SummedLoss``: takes TRAK's general-cost path."""

    name = "named_loss"
    decomposable = True

    def cost(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="sum")


def test_general_cost_target_uses_the_cost_rule(convex) -> None:
    """For a cost U the target feature is -phi(grad U). With U the summed loss,
    -grad U = sum_t Q_t grad f_t, so the score is the Q_t-weighted sum of the pairwise tau."""
    ctx = convex["few"]
    _, _, matrix = TRAK().pairwise(ctx)
    with torch.no_grad():
        logits = ctx.model_at(ctx.final)(ctx.target_x)
    q_target = torch.sigmoid(-margins(logits, ctx.target_y)).numpy()
    cost = TRAK().score(dataclasses.replace(ctx, target=_NamedLoss()))
    np.testing.assert_allclose(cost.score, matrix @ q_target, rtol=1e-8, atol=1e-12)


def test_registry_and_validation() -> None:
    with pytest.raises(ValueError, match="checkpoints"):
        TRAK(checkpoints="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        TRAK(kind="sparse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="regularization"):
        TRAK(regularization=-1.0)
    try:
        estimator = make_estimator("trak", k=32)
    except KeyError:
        pytest.skip("trak is not registered yet")
    assert isinstance(estimator, TRAK) and estimator.k == 32
