"""Shared data and helpers for the estimator tests (CPU, float64, no downloads).

Helpers reach tests through the ``kit`` fixture (never ``import conftest``); the cases several
files score (leave-one-out truth, an MLP at its optimum, a mislabeled duplicate) are
session-scoped fixtures that build each variant once."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
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


def fit_lbfgs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lam: float,
    weights: torch.Tensor | None = None,
    max_iter: int = 1000,
    tolerance_grad: float = 1e-11,
    tolerance_change: float = 1e-15,
) -> nn.Module:
    """Minimize mean CE + (lam/2)||theta||^2 (all parameters) to a tight tolerance; with
    ``weights``, ``(1/n) sum_i w_i CE_i`` in place of the mean (n = len(y))."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        history_size=30,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        penalty = sum((p * p).sum() for p in model.parameters())
        if weights is None:
            loss = nn.functional.cross_entropy(model(x), y) + lam / 2 * penalty
        else:
            loss = (weights * F.cross_entropy(model(x), y, reduction="none")).sum() / len(y)
            loss = loss + lam / 2 * penalty
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def train_mlp(
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    epochs: int = 40,
    hidden: int = 16,
    lr: float = 0.1,
    weight_decay: float = 1e-3,
) -> tuple[Callable[[], nn.Module], list[Checkpoint]]:
    """A 15-hidden-3 tanh MLP (torch seed ``seed``) by minibatch SGD (batches of 32 in a seeded
    order) with weight decay; a checkpoint every 10 epochs. Returns (factory, checkpoints)."""
    torch.manual_seed(seed)
    factory = mlp_factory(hidden=hidden)
    model = factory()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    checkpoints, step = [], 0
    for epoch in range(epochs):
        for batch in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(tx[batch]), ty[batch]).backward()
            opt.step()
            step += 1
        if epoch % 10 == 9:
            checkpoints.append(snapshot(model, index=len(checkpoints), step=step, lr=lr))
    return factory, checkpoints


def duplicate_mislabeled(x: np.ndarray, y: np.ndarray, copies: int) -> tuple[np.ndarray, ...]:
    """The most typical '3' (label 0) replaced by ``copies`` copies labelled '5', appended last."""
    threes = np.flatnonzero(y == 0)
    typical = threes[np.argmin(((x[threes] - x[threes].mean(0)) ** 2).sum(1))]
    x = np.concatenate([np.delete(x, typical, 0), np.repeat(x[typical : typical + 1], copies, 0)])
    y = np.concatenate([np.delete(y, typical), np.full(copies, 1)])
    return x, y


def softmax_loss_and_grad(
    theta: np.ndarray, x: np.ndarray, y: np.ndarray, weights: np.ndarray
) -> tuple[float, np.ndarray]:
    """Weighted summed cross-entropy of a linear softmax model and its gradient (W then b)."""
    features = x.shape[1]
    classes = len(theta) // (features + 1)
    w, b = theta[: classes * features].reshape(classes, features), theta[classes * features :]
    logits = x @ w.T + b
    logits -= logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(logits).sum(axis=1))
    rows = np.arange(len(y))
    residual = np.exp(logits - log_norm[:, None])
    residual[rows, y] -= 1
    residual *= weights[:, None]
    grad = np.concatenate([(residual.T @ x).ravel(), residual.sum(axis=0)])
    return float(weights @ (log_norm - logits[rows, y])), grad


def fit_softmax(
    theta0: np.ndarray, x: np.ndarray, y: np.ndarray, weights: np.ndarray, lam: float
) -> np.ndarray:
    """Minimize ``(1/n) sum_i w_i l_i + (lam/2)||theta||^2`` (n = len(y)) by scipy L-BFGS."""
    n = len(y)

    def objective(theta: np.ndarray):
        loss, grad = softmax_loss_and_grad(theta, x, y, weights)
        return loss / n + lam / 2 * theta @ theta, grad / n + lam * theta

    options = {"maxiter": 10_000, "maxcor": 30, "ftol": 1e-16, "gtol": 1e-10}
    result = scipy.optimize.minimize(
        objective, theta0, jac=True, method="L-BFGS-B", options=options
    )
    assert np.abs(objective(result.x)[1]).max() < 1e-8, "L-BFGS did not converge"
    return result.x


def _scipy_logistic(digits: dict[str, np.ndarray], lam: float):
    """The optimum by numpy + scipy (independent of torch), and i -> U(theta_without_i) - U."""
    x, y, tx, ty = digits["train_x"], digits["train_y"], digits["test_x"], digits["test_y"]
    n, features = x.shape
    classes = len(DIGIT_CLASSES)
    theta = fit_softmax(np.zeros(classes * (features + 1)), x, y, np.ones(n), lam)

    def target_loss(th: np.ndarray) -> float:
        return softmax_loss_and_grad(th, tx, ty, np.ones(len(ty)))[0]

    def delta(i: int) -> float:
        weights = np.ones(n)
        weights[i] = 0.0
        return target_loss(fit_softmax(theta, x, y, weights, lam)) - target_loss(theta)

    model = linear_factory(features, classes)()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(theta[: classes * features].reshape(classes, -1)))
        model.bias.copy_(torch.from_numpy(theta[classes * features :]))
    return model, delta


def _torch_logistic(digits: dict[str, np.ndarray], lam: float):
    """The optimum by ``fit_lbfgs``, and i -> U(theta_without_i) - U by warm-started torch
    L-BFGS on ``(1/n) sum_{j != i} l_j + (lam/2)||theta||^2``."""
    x, y = torch.as_tensor(digits["train_x"]), torch.as_tensor(digits["train_y"])
    tx, ty = torch.as_tensor(digits["test_x"]), torch.as_tensor(digits["test_y"])
    n = len(y)
    model = fit_lbfgs(linear_factory()(), x, y, lam)

    def target_loss(m: nn.Module) -> float:
        with torch.no_grad():
            return F.cross_entropy(m(tx), ty, reduction="sum").item()

    base = target_loss(model)

    def delta(i: int) -> float:
        weights = torch.ones(n, dtype=torch.float64)
        weights[i] = 0
        m = fit_lbfgs(copy.deepcopy(model), x, y, lam, weights, 500, 1e-12, 1e-16)
        return target_loss(m) - base

    return model, delta


@pytest.fixture(scope="session")
def loo_case(digits) -> Callable[..., dict]:
    """``loo_case(n_removed, solver="scipy", lam=1e-2, seed=1)``: L2-regularized multinomial
    logistic regression on the digits (n=300, d=48) at its optimum, as a dict: ``model``,
    ``ctx`` (all 150 targets, weight decay lam), ``few`` (the first 20 targets), ``n``,
    ``removed`` (``default_rng(seed).choice(n, n_removed)``) and ``delta``, the leave-one-out
    truth ``U(theta_without_i) - U(theta)`` (U = summed test cross-entropy) for each removed i.

    The objective is ``(1/n) sum_{i in S} l_i + (lam/2)||theta||^2`` with n fixed, so removing i
    is the weight change -1/n. solver "scipy" fits with numpy + scipy L-BFGS (independent of
    torch), "torch" with torch L-BFGS. Each fit and each retrain is done once per session."""
    fits: dict[tuple[str, float], tuple[dict, Callable[[int], float]]] = {}
    deltas: dict[tuple[str, float, int], float] = {}
    builders = {"scipy": _scipy_logistic, "torch": _torch_logistic}

    def case(n_removed: int, solver: str = "scipy", lam: float = 1e-2, seed: int = 1) -> dict:
        key = (solver, lam)
        if key not in fits:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, retrain = builders[solver](digits, lam)
            ckpt = snapshot(model, index=0, step=1, lr=1.0)
            x, y, tx, ty = (digits[k] for k in ("train_x", "train_y", "test_x", "test_y"))
            fitted = {
                "model": model,
                "ctx": make_context(linear_factory(), [ckpt], x, y, tx, ty, lam),
                "few": make_context(linear_factory(), [ckpt], x, y, tx[:20], ty[:20], lam),
                "n": len(y),
            }
            fits[key] = fitted, retrain
        fitted, retrain = fits[key]
        removed = np.random.default_rng(seed).choice(fitted["n"], size=n_removed, replace=False)
        for i in removed:
            if (*key, i) not in deltas:
                deltas[(*key, i)] = retrain(i)
        delta = np.array([deltas[(*key, i)] for i in removed])
        return {**fitted, "removed": removed, "delta": delta}

    return case


@pytest.fixture(scope="session")
def lbfgs_mlp(digits) -> ScoringContext:
    """A 15-16-3 tanh MLP (torch seed 0) at the optimum of mean CE + (1e-3/2)||theta||^2 by
    ``fit_lbfgs``, scored against the first 40 test digits (weight decay 1e-3)."""
    x, y = torch.as_tensor(digits["train_x"]), torch.as_tensor(digits["train_y"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = fit_lbfgs(mlp_factory()(), x, y, 1e-3)
    return make_context(
        mlp_factory(),
        [snapshot(model, 0, 1, 1.0)],
        digits["train_x"],
        digits["train_y"],
        digits["test_x"][:40],
        digits["test_y"][:40],
        1e-3,
    )


@pytest.fixture(scope="session")
def mislabeled_case(digits) -> Callable[..., ScoringContext]:
    """``mislabeled_case(kind, copies, weight_decay)``: the digits after ``duplicate_mislabeled``
    (the copies are the last ``copies`` train ids) and a model trained on them, scored against
    all 150 test digits with the given weight decay. kind "linear": L2 (1e-2) logistic
    regression by ``fit_lbfgs`` from torch seed 0, one checkpoint; "mlp": ``train_mlp`` with
    seed 0, four checkpoints. Each model and each context is built once per session."""
    models: dict[tuple[str, int], tuple] = {}
    contexts: dict[tuple[str, int, float], ScoringContext] = {}

    def case(kind: str, copies: int, weight_decay: float) -> ScoringContext:
        if (kind, copies) not in models:
            x, y = duplicate_mislabeled(digits["train_x"], digits["train_y"], copies)
            with torch.random.fork_rng(devices=[]):
                if kind == "linear":
                    torch.manual_seed(0)
                    factory = linear_factory()
                    model = fit_lbfgs(factory(), torch.from_numpy(x), torch.from_numpy(y), 1e-2)
                    checkpoints = [snapshot(model, index=0, step=1, lr=1.0)]
                else:
                    factory, checkpoints = train_mlp(x, y, seed=0)
            models[(kind, copies)] = (x, y, factory, checkpoints)
        if (kind, copies, weight_decay) not in contexts:
            x, y, factory, checkpoints = models[(kind, copies)]
            contexts[(kind, copies, weight_decay)] = make_context(
                factory, checkpoints, x, y, digits["test_x"], digits["test_y"], weight_decay
            )
        return contexts[(kind, copies, weight_decay)]

    return case


def assert_pairwise_sums_to_score(estimator, ctx: ScoringContext, n_targets: int) -> None:
    """``estimator.pairwise(ctx)`` has one column per target (ids 0..n_targets-1), rows in the
    order of ``estimator.score(ctx)``, and its rows sum to that summed-target score."""
    train_ids, target_ids, matrix = estimator.pairwise(ctx)
    summed = estimator.score(ctx)
    assert matrix.shape == (len(ctx.train_ids), n_targets)
    np.testing.assert_array_equal(target_ids, np.arange(n_targets))
    np.testing.assert_array_equal(train_ids, summed.sample_ids)
    np.testing.assert_allclose(matrix.sum(axis=1), summed.score, rtol=1e-8, atol=1e-10)


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helper functions above, for tests."""
    return SimpleNamespace(
        linear_factory=linear_factory,
        mlp_factory=mlp_factory,
        snapshot=snapshot,
        make_context=make_context,
        fit_lbfgs=fit_lbfgs,
        train_mlp=train_mlp,
        duplicate_mislabeled=duplicate_mislabeled,
        softmax_loss_and_grad=softmax_loss_and_grad,
        fit_softmax=fit_softmax,
        assert_pairwise_sums_to_score=assert_pairwise_sums_to_score,
    )
