"""Shared data and helpers for the estimator tests (CPU, float64, no downloads).

Helpers reach tests through the ``kit`` fixture (never ``import conftest``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits
from torch import nn

from estimators import Checkpoint, InMemoryGradients, ScoringContext

DIGIT_CLASSES = (3, 5, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One torch thread and one BLAS thread: small matrices on 2 cores run faster that way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits() -> dict[str, np.ndarray]:
    """Digits 3/5/8 (labels 0/1/2), PCA to 15 standardized features: 300 train, 150 test."""
    x, y = load_digits(return_X_y=True)
    keep = np.isin(y, DIGIT_CLASSES)
    x, y = x[keep], np.searchsorted(DIGIT_CLASSES, y[keep])
    perm = np.random.default_rng(0).permutation(len(y))
    train, test = perm[:300], perm[300:450]
    z = PCA(15, random_state=0).fit(x[train]).transform(x)
    z = (z - z[train].mean(0)) / z[train].std(0)
    return {"train_x": z[train], "train_y": y[train], "test_x": z[test], "test_y": y[test]}


def linear_factory(features: int = 15, classes: int = 3) -> Callable[[], nn.Module]:
    return lambda: nn.Linear(features, classes).to(torch.float64)


def mlp_factory(features: int = 15, hidden: int = 16, classes: int = 3) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(
            torch.float64
        )

    return make


def snapshot(model: nn.Module, index: int, step: int, lr: float) -> Checkpoint:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Checkpoint(index=index, step=step, lr=lr, load=lambda: state)


def make_context(
    factory: Callable[[], nn.Module],
    checkpoints: Sequence[Checkpoint],
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    weight_decay: float = 0.0,
    shard_size: int = 64,
) -> ScoringContext:
    """A context over numpy data with in-memory gradients (odd shard size on purpose)."""
    ctx = ScoringContext(
        model_factory=factory,
        checkpoints=list(checkpoints),
        train_ids=np.arange(len(train_y), dtype=np.int64) + 1000,
        train_x=torch.as_tensor(train_x, dtype=torch.float64),
        train_y=torch.as_tensor(train_y, dtype=torch.int64),
        target_x=torch.as_tensor(test_x, dtype=torch.float64),
        target_y=torch.as_tensor(test_y, dtype=torch.int64),
        weight_decay=weight_decay,
    )
    ctx.gradients = InMemoryGradients.from_context(ctx, shard_size=shard_size)
    return ctx


def fit_lbfgs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float) -> nn.Module:
    """Minimize mean CE + (lam/2)||theta||^2 (all parameters) to a tight tolerance."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=1000,
        tolerance_grad=1e-11,
        tolerance_change=1e-15,
        history_size=30,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        penalty = sum((p * p).sum() for p in model.parameters())
        loss = nn.functional.cross_entropy(model(x), y) + lam / 2 * penalty
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helper functions above, for tests."""
    return SimpleNamespace(
        linear_factory=linear_factory,
        mlp_factory=mlp_factory,
        snapshot=snapshot,
        make_context=make_context,
        fit_lbfgs=fit_lbfgs,
    )
