"""Fairness and robustness targets (spec section 8): their gradients against finite differences,
their sign against actual leave-one-out retraining, attacks, and every estimator accepting them.

Data: two Gaussian classes whose positive rate depends on a binary group (so a gap exists), an
L2 logistic regression (nn.Linear(4, 2), float64) fitted to a tight tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from estimators import ESTIMATORS, ScoringContext, make_estimator
from estimators.fairness_targets import (
    DemographicParity,
    EqualizedOdds,
    EqualOpportunity,
    fairness_gaps,
)
from estimators.robustness_targets import AdversarialLoss, fgsm, pgd

LAM = 1e-2
FEATURES = 4


def _biased_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n, 4), y (n,), group (n,): group 1 is positive more often; feature 0 leaks the group."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n)
    y = (rng.random(n) < np.where(group == 1, 0.7, 0.3)).astype(np.int64)
    x = rng.normal(size=(n, FEATURES)) + 0.8 * (2 * y[:, None] - 1) * np.array([1, 0.5, 0, 0])
    x[:, 0] += 1.0 * group
    return x, y, group


@pytest.fixture(scope="module")
def case(kit) -> dict:
    x, y, group = _biased_data(200, seed=0)
    vx, vy, vgroup = _biased_data(120, seed=1)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    model = kit.fit_lbfgs(nn.Linear(FEATURES, 2).to(torch.float64), tx, ty, LAM)
    return {"x": tx, "y": ty, "group": group, "vx": torch.from_numpy(vx),
            "vy": torch.from_numpy(vy), "vgroup": vgroup, "model": model}


TARGETS = [DemographicParity, EqualOpportunity, EqualizedOdds]


@pytest.mark.parametrize("cls", TARGETS, ids=lambda c: c.name)
def test_gradient_matches_finite_differences(case, cls) -> None:
    """grad U from ``Target.gradient`` equals the central difference of U along a direction."""
    target, model = cls(case["vgroup"]), case["model"]
    g = target.gradient(model, case["vx"], case["vy"])
    params = list(model.parameters())
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(3),
                             dtype=p.dtype) for p in params]
    flat = torch.cat([d.reshape(-1) for d in direction])
    eps = 1e-6

    def cost_at(step: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(step * d)
            value = float(target.cost(model(case["vx"]), case["vy"]))
            for p, d in zip(params, direction, strict=True):
                p.sub_(step * d)
        return value

    numeric = (cost_at(eps) - cost_at(-eps)) / (2 * eps)
    assert float(g @ flat) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_surrogates_match_their_formulas(case) -> None:
    """The costs are the absolute gaps of group means (DP on p, EOP on the loss of y=1 rows)."""
    logits = case["model"](case["vx"]).detach()
    y, s = case["vy"].numpy(), case["vgroup"]
    p = torch.softmax(logits, 1)[:, 1].numpy()
    loss = F.cross_entropy(logits, case["vy"], reduction="none").numpy()
    dp = abs(p[s == 1].mean() - p[s == 0].mean())
    eop = abs(loss[(s == 0) & (y == 1)].mean() - loss[(s == 1) & (y == 1)].mean())
    eo = sum(abs(p[(s == 1) & (y == c)].mean() - p[(s == 0) & (y == c)].mean()) for c in (0, 1))
    assert float(DemographicParity(s).cost(logits, case["vy"])) == pytest.approx(dp)
    assert float(EqualOpportunity(s).cost(logits, case["vy"])) == pytest.approx(eop)
    assert float(EqualizedOdds(s).cost(logits, case["vy"])) == pytest.approx(eo)
    assert dp > 0.1, "the biased data should give the model a demographic-parity gap"


def test_gradient_is_sign_times_signed_gradient(case) -> None:
    """grad |U| = sign(U) grad U: flipping the group labels leaves the gradient unchanged."""
    model, vx, vy, s = case["model"], case["vx"], case["vy"], case["vgroup"]
    g = DemographicParity(s).gradient(model, vx, vy)
    flipped = DemographicParity(1 - s).gradient(model, vx, vy)
    torch.testing.assert_close(g, flipped)


def test_exact_influence_predicts_leave_one_out_change_of_the_gap(case, kit) -> None:
    """Sign test: exact-influence scores against the DP target rank like n * [U(theta_-i) -
    U(theta)] from actual retraining (warm start, same tolerance) on 30 samples."""
    model, target = case["model"], DemographicParity(case["vgroup"])
    ctx = _context(case, kit, target)
    scores = make_estimator("if_exact").score(ctx).score

    def gap(m: nn.Module) -> float:
        with torch.no_grad():
            return float(target.cost(m(case["vx"]), case["vy"]))

    base = gap(model)
    picked = np.random.default_rng(0).choice(len(case["y"]), 30, replace=False)
    actual = []
    for i in picked:
        weights = torch.ones(len(case["y"]), dtype=torch.float64)
        weights[i] = 0
        retrained = nn.Linear(FEATURES, 2).to(torch.float64)
        retrained.load_state_dict(model.state_dict())
        kit.fit_lbfgs(retrained, case["x"], case["y"], LAM, weights=weights)
        actual.append(len(case["y"]) * (gap(retrained) - base))
    rho = spearmanr(scores[picked], actual).statistic
    assert rho > 0.9
    np.testing.assert_allclose(scores[picked], actual, rtol=0.2, atol=0.02 * np.abs(actual).max())


def _context(case: dict, kit, target, target_x: torch.Tensor | None = None) -> ScoringContext:
    """Three checkpoints of the fitted model's path (0.5x, 0.8x, 1x its parameters)."""
    state = case["model"].state_dict()
    checkpoints = [kit.snapshot(_scaled(state, f), i, 10 * (i + 1), 0.1)
                   for i, f in enumerate((0.5, 0.8, 1.0))]
    ctx = kit.make_context(
        lambda: nn.Linear(FEATURES, 2).to(torch.float64), checkpoints, case["x"].numpy(),
        case["y"].numpy(), (case["vx"] if target_x is None else target_x).numpy(),
        case["vy"].numpy(), weight_decay=LAM,
    )
    ctx.target = target
    ctx.gradients = None
    return ctx


def _scaled(state: dict, factor: float) -> nn.Module:
    model = nn.Linear(FEATURES, 2).to(torch.float64)
    model.load_state_dict({k: v * factor for k, v in state.items()})
    return model


@pytest.mark.parametrize("name", [n for n in ESTIMATORS if n not in ("random", "loss")])
def test_every_estimator_accepts_the_utility_targets(case, kit, name) -> None:
    """Each target-gradient estimator scores against DP (not a sum over rows) and the frozen
    adversarial loss; the utility scores differ from the plain-loss scores."""
    options = {"ip_ensemble": {"k": 2}, "if_lissa": {"depth": 50},
               "if_arnoldi": {"n_iter": 20, "rank": 5}}.get(name, {})
    estimator = make_estimator(name, **options)
    dp = estimator.score(_context(case, kit, DemographicParity(case["vgroup"]))).score
    adv_x = fgsm(case["model"], case["vx"], case["vy"], eps=0.25)
    rob = estimator.score(_context(case, kit, AdversarialLoss(), target_x=adv_x)).score
    assert dp.shape == rob.shape == (len(case["y"]),)
    assert np.isfinite(dp).all() and np.isfinite(rob).all()
    assert np.abs(dp).max() > 0 and not np.allclose(dp / np.abs(dp).max(),
                                                     rob / np.abs(rob).max())


def test_attacks_lower_accuracy_and_stay_in_the_ball(case) -> None:
    model, x, y = case["model"], case["vx"], case["vy"]
    clean = (model(x).argmax(1) == y).double().mean()
    for adv in (fgsm(model, x, y, eps=0.3), pgd(model, x, y, eps=0.3, steps=10, seed=1)):
        assert float((adv - x).abs().max()) <= 0.3 + 1e-12
        assert (model(adv).argmax(1) == y).double().mean() < clean - 0.1
    torch.testing.assert_close(pgd(model, x, y, 0.3, seed=1), pgd(model, x, y, 0.3, seed=1))
    clipped = pgd(model, x, y, 0.3, clip=(-1.0, 1.0))
    assert float(clipped.min()) >= -1 and float(clipped.max()) <= 1


def test_hard_gaps() -> None:
    pred = np.array([1, 1, 0, 1, 0, 0, 1, 0])
    y = np.array([1, 0, 1, 1, 1, 0, 1, 0])
    s = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    gaps = fairness_gaps(pred, y, s)
    assert gaps["dp_gap"] == pytest.approx(0.75 - 0.25)
    assert gaps["eop_gap"] == pytest.approx(abs(2 / 3 - 1 / 2))
    assert gaps["eo_gap"] == pytest.approx(abs(2 / 3 - 1 / 2) + abs(1 - 0))


def test_bad_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="only one protected group"):
        DemographicParity(np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="0/1"):
        DemographicParity(np.array([0, 1, 2]))
