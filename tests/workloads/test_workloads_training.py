"""workloads.training: determinism, checkpoints, lr schedules and that training trains."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workloads.datasets import load_digits
from workloads.models import logistic_regression, mlp, seeded_model
from workloads.training import CheckpointEvent, Recipe, accuracy, checkpoint_epochs, train


@pytest.fixture(scope="module")
def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    samples = load_digits({"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    rows = samples.indices("train")
    return torch.from_numpy(samples.x[rows]), torch.from_numpy(samples.label[rows])


@pytest.fixture(scope="module")
def small(digits_train) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_train
    return x[:200], y[:200]


def _fresh_mlp(init_seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(init_seed)
    return mlp(64, 10, hidden=16)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---- determinism -------------------------------------------------------------------------


def test_same_seed_is_bit_identical(small) -> None:
    x, y = small
    recipe = Recipe(epochs=3, batch_size=16)
    a, b = _fresh_mlp(), _fresh_mlp()
    losses_a = train(a, x, y, recipe, seed=3)
    losses_b = train(b, x, y, recipe, seed=3)
    assert losses_a == losses_b
    assert len(losses_a) == 3 * math.ceil(200 / 16)
    for pa, pb in zip(_params(a), _params(b), strict=True):
        assert torch.equal(pa, pb)
    # and training moved the parameters
    assert any(not torch.equal(p, q) for p, q in zip(_params(a), _params(_fresh_mlp()),
                                                      strict=True))


def test_different_seeds_differ(small) -> None:
    x, y = small
    recipe = Recipe(epochs=2, batch_size=16)
    a, b = _fresh_mlp(), _fresh_mlp()
    losses_a = train(a, x, y, recipe, seed=3)
    losses_b = train(b, x, y, recipe, seed=4)
    assert losses_a != losses_b
    assert any(not torch.equal(p, q) for p, q in zip(_params(a), _params(b), strict=True))


def test_adam_is_deterministic_too(small) -> None:
    x, y = small
    recipe = Recipe(epochs=2, batch_size=32, optimizer="adam", lr=0.01)
    a, b = _fresh_mlp(), _fresh_mlp()
    assert train(a, x, y, recipe, seed=1) == train(b, x, y, recipe, seed=1)
    for pa, pb in zip(_params(a), _params(b), strict=True):
        assert torch.equal(pa, pb)


# ---- checkpoints -------------------------------------------------------------------------


def test_checkpoint_epochs() -> None:
    assert checkpoint_epochs(30, 5) == [6, 12, 18, 24, 30]
    assert checkpoint_epochs(30, 1) == [30]
    assert checkpoint_epochs(3, 10) == [1, 2, 3]
    assert checkpoint_epochs(5, 0) == [5]
    for epochs in range(1, 40):
        for count in range(1, 12):
            got = checkpoint_epochs(epochs, count)
            assert got[-1] == epochs
            assert got == sorted(set(got))
            assert len(got) == min(count, epochs)
            assert got[0] >= 1


def test_on_checkpoint_events(small) -> None:
    x, y = small
    recipe = Recipe(epochs=6, batch_size=32, schedule="cosine", lr=0.2)
    steps_per_epoch = math.ceil(200 / 32)  # 7
    events: list[CheckpointEvent] = []
    model = _fresh_mlp()
    train(model, x, y, recipe, seed=0, checkpoints=3, on_checkpoint=events.append)
    assert [e.index for e in events] == [0, 1, 2]
    assert [e.epoch for e in events] == [2.0, 4.0, 6.0]
    assert [e.step for e in events] == [2 * steps_per_epoch, 4 * steps_per_epoch,
                                        6 * steps_per_epoch]
    previous = 0
    for event in events:
        expected = np.mean([recipe.lr_at(s, steps_per_epoch)
                            for s in range(previous, event.step)])
        assert event.lr == pytest.approx(expected, rel=1e-12)
        previous = event.step
    # cosine: later intervals have lower mean lr
    assert events[0].lr > events[1].lr > events[2].lr > 0
    # the last checkpoint holds the final weights; earlier ones are copies, not live views
    final = model.state_dict()
    for key, value in events[-1].state_dict.items():
        assert torch.equal(value, final[key])
    assert any(not torch.equal(v, final[k]) for k, v in events[0].state_dict.items())
    assert set(events[0].state_dict) == set(final)


def test_on_epoch_reports_mean_epoch_loss(small) -> None:
    x, y = small
    seen: list[tuple[int, float]] = []
    losses = train(_fresh_mlp(), x, y, Recipe(epochs=3, batch_size=50), seed=0,
                   on_epoch=lambda e, loss: seen.append((e, loss)))
    assert [e for e, _ in seen] == [1, 2, 3]
    for epoch, loss in seen:
        assert loss == pytest.approx(np.mean(losses[(epoch - 1) * 4 : epoch * 4]))


# ---- lr schedules ------------------------------------------------------------------------


def test_cosine_lr_goes_to_zero() -> None:
    recipe = Recipe(epochs=10, lr=0.3, schedule="cosine")
    spe = 17
    total = 10 * spe
    lrs = [recipe.lr_at(s, spe) for s in range(total)]
    assert lrs[0] == pytest.approx(0.3)
    assert lrs[total // 2] == pytest.approx(0.15)
    assert lrs[-1] < 1e-3 * 0.3
    assert recipe.lr_at(total, spe) == pytest.approx(0.0, abs=1e-15)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


def test_step_lr_multiplies_by_gamma() -> None:
    recipe = Recipe(epochs=9, lr=0.2, schedule="step", step_epochs=3, gamma=0.5)
    spe = 4
    for step in range(9 * spe):
        epoch = step // spe
        assert recipe.lr_at(step, spe) == pytest.approx(0.2 * 0.5 ** (epoch // 3))
    assert recipe.lr_at(3 * spe - 1, spe) == pytest.approx(0.2)
    assert recipe.lr_at(3 * spe, spe) == pytest.approx(0.1)
    assert recipe.lr_at(6 * spe, spe) == pytest.approx(0.05)


def test_constant_lr() -> None:
    recipe = Recipe(epochs=4, lr=0.05, schedule="constant")
    assert {recipe.lr_at(s, 3) for s in range(12)} == {0.05}


def test_step_schedule_checkpoint_lrs(small) -> None:
    x, y = small
    recipe = Recipe(epochs=4, batch_size=100, schedule="step", step_epochs=2, gamma=0.1,
                    lr=0.1)
    events: list[CheckpointEvent] = []
    train(_fresh_mlp(), x, y, recipe, seed=0, checkpoints=2, on_checkpoint=events.append)
    assert [e.lr for e in events] == pytest.approx([0.1, 0.01])


# ---- it trains ---------------------------------------------------------------------------


def test_logreg_learns_digits(digits_train) -> None:
    x, y = digits_train
    torch.manual_seed(0)
    model = logistic_regression(64, 10)
    before = accuracy(model, x, y)
    epoch_losses: list[float] = []
    train(model, x, y, Recipe(epochs=5, batch_size=32, lr=0.1), seed=0,
          on_epoch=lambda _, loss: epoch_losses.append(loss))
    after = accuracy(model, x, y)
    assert before < 0.3
    assert after > 0.9
    assert epoch_losses[-1] < 0.5 * epoch_losses[0]
    assert not model.training  # left in eval mode


def test_accuracy() -> None:
    model = torch.nn.Identity()
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [1.0, 2.0]])
    assert accuracy(model, logits, torch.tensor([0, 1, 1, 0])) == 0.5
    assert accuracy(model, logits, torch.tensor([0, 1, 0, 1])) == 1.0


def test_keep_mask_drops_samples_and_changes_nothing_else():
    from workloads.models import logistic_regression, seeded_model
    from workloads.training import Recipe, train

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(50, 4)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 3, 50))
    recipe = Recipe(epochs=3, batch_size=8)

    def fit(x, y, keep=None):
        model = seeded_model(lambda: logistic_regression(4, 3), 1)
        losses = train(model, x, y, recipe, seed=2, keep=keep)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), losses

    everything, _ = fit(x, y)
    assert torch.equal(fit(x, y, keep=np.ones(50, bool))[0], everything)
    keep = np.ones(50, bool)
    keep[[3, 17]] = False
    without, _ = fit(x, y, keep=keep)
    assert not torch.equal(without, everything)
    x_changed = x.clone()
    x_changed[[3, 17]] = 100.0  # a dropped row's content must not matter
    assert torch.equal(fit(x_changed, y, keep=keep)[0], without)


# ---- lbfgs: a convex model fitted to its optimum ------------------------------------------


def _objective_gradient(model: torch.nn.Module, x, y, weight_decay: float) -> float:
    """Largest entry of the gradient of mean CE + (wd/2)||theta||^2, in float64."""
    model64 = copy.deepcopy(model).double()
    params = list(model64.parameters())
    loss = F.cross_entropy(model64(x.double()), y)
    loss = loss + 0.5 * weight_decay * sum((p * p).sum() for p in params)
    return max(float(g.abs().max()) for g in torch.autograd.grad(loss, params))


def test_lbfgs_reaches_the_optimum_whatever_the_seed(digits_train) -> None:
    x, y = digits_train
    recipe = Recipe(epochs=3, optimizer="lbfgs", weight_decay=1e-3)
    fits, events = [], []
    for seed in (0, 1):
        model = seeded_model(lambda: logistic_regression(64, 10), seed)
        start = _objective_gradient(model, x, y, 1e-3)
        losses = train(model, x, y, recipe, seed=seed, checkpoints=3,
                       on_checkpoint=events.append)
        assert len(losses) == 3 and losses[-1] < 0.5
        assert _objective_gradient(model, x, y, 1e-3) < 1e-6 < 1e-3 * start
        fits.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    # one optimum: two initializations agree to float32 rounding
    assert float((fits[0] - fits[1]).abs().max()) < 1e-5
    assert [e.lr for e in events] == [1.0] * 6 and events[2].step >= events[0].step > 0
    again = seeded_model(lambda: logistic_regression(64, 10), 0)
    train(again, x, y, recipe, seed=0)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in again.parameters()]),
                       fits[0])  # deterministic


def test_lbfgs_keep_mask_fits_the_kept_rows_only(small) -> None:
    x, y = small
    recipe = Recipe(epochs=2, optimizer="lbfgs", weight_decay=1e-2)
    keep = np.ones(len(y), bool)
    keep[::7] = False

    def fit(x, y, keep=None):
        model = seeded_model(lambda: logistic_regression(64, 10), 3)
        train(model, x, y, recipe, seed=0, keep=keep)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    masked = fit(x, y, keep)
    torch.testing.assert_close(masked, fit(x[keep], y[keep]), atol=1e-5, rtol=0)
    assert float((masked - fit(x, y)).abs().max()) > 1e-3
