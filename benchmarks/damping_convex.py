"""Damping on a convex model trained to convergence: Sieve's influence estimators against exact
leave-one-out and LDS (issue 15's first acceptance line, in the issue's own setting).

    python -m benchmarks.damping_convex [--noise 0.2] [--removals 50] [--subsets 100]
        [--targets 100] [--estimators if_exact,if_cg,if_arnoldi] [--dampings default,0,0.01]
        [--measurement margin]

Digits as Sieve splits it (seed 0; ``--noise`` of the training labels flipped, default 20 %),
an L2 logistic regression (weight decay 1e-3) fitted by L-BFGS and then Newton in float64 to a
gradient of max-norm 1e-12 (the worst max-norm over all fits is printed). Every refit minimizes
``mean CE over the kept rows + (1e-3/2) ||w||^2`` (what retraining on those rows with the same
recipe does), warm-started from the full fit. The
problem is strictly convex, so its optimum depends neither on the initialization nor on the
data order: Sieve's fixed-seed LDS and a fresh-seed LDS are one and the same number here, and
one refit per subset is the exact ground truth.

- **LOO**: the change of the summed validation loss when each of ``--removals`` training samples
  (drawn as ``tasks.evaluation.plan_retrains`` draws them) is left out, against the estimator's
  ``score`` for the summed validation loss (``estimators.counterfactual.loo_correlation``:
  score > 0 = the sample helps = removing it raises the loss, as in ``tasks.evaluation``).
- **LDS**: ``--subsets`` half-size subsets (drawn as ``plan_retrains`` draws them), each refit;
  outcome = the margin (``estimators.trak.margins``: correct logit minus the log-sum-exp of the
  others, ``tasks.groundtruth``) of ``--targets`` test samples (``tasks.score.pairwise_targets``);
  attributions = ``estimator.pairwise`` against those targets with the per-row cost
  ``tasks.utility.measurement`` (``--measurement``: task.measurement, default ``margin``), as
  ``tasks.score.scoring_context(..., pairwise=True)`` builds it; ``estimators.counterfactual.lds``
  and ``mean_ci`` (95 % Student-t CI over targets). For a linear softmax model a row's loss
  gradient is (1 - p_y) times its margin gradient, so both measurements give the same LDS.

Each estimator (``estimators.registry.make_estimator``) runs at its default damping (relative to
the curvature, ``estimators.damping``; the value it used is shown) and at each fixed
``--dampings`` value, on a float64 ``torch.nn.Linear`` holding the fit and in-memory per-sample
gradients (``InMemoryGradients``). Seconds = ``score`` + ``pairwise`` of one fresh estimator,
one thread. The last column is LDS minus the LDS of ``if_exact`` at damping 0: the exact
influence function, which is what an estimator at damping 0 should reproduce here (nan when
that row is not run).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from estimators import Checkpoint, InMemoryGradients, ScoringContext
from estimators.counterfactual import lds, loo_correlation, mean_ci
from estimators.registry import ESTIMATORS, estimator_options, make_estimator
from estimators.targets import SummedLoss
from estimators.trak import margins
from tasks.config import Config
from tasks.score import pairwise_targets
from tasks.utility import measurement
from workloads.datasets import load_digits
from workloads.noise import flip_labels

WEIGHT_DECAY = 1e-3
SEED = 0
CLASSES = 10
TOLERANCE = 1e-12
"""Max-norm of the objective's gradient at which a fit stops."""
NEWTON_STEPS = 5


@dataclass
class Problem:
    """The data (float64 features, int64 labels) and the full fit's weights ``w`` (W then b)."""

    x: torch.Tensor
    y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    target_x: torch.Tensor
    target_y: torch.Tensor
    target_ids: np.ndarray
    w: torch.Tensor


@dataclass
class Row:
    estimator: str
    damping: str
    lds: tuple[float, float, float]
    loo: tuple[float, float]
    seconds: float
    vs_exact: float = float("nan")


def logits(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    features = rows.shape[1]
    return rows @ w[: CLASSES * features].view(CLASSES, features).T + w[CLASSES * features:]


def hessian(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The Hessian of ``mean CE(x, .) + (WEIGHT_DECAY/2) ||w||^2`` at ``w`` in closed form
    (independent of Sieve's curvature code): ``mean_i (diag p_i - p_i p_i^T) (x) a_i a_i^T``
    with ``a_i = [x_i, 1]``, reordered to the W-then-b layout, plus the weight decay."""
    m, features = x.shape
    xa = torch.cat([x, torch.ones(m, 1, dtype=x.dtype)], 1)
    p = torch.softmax(logits(w, x), 1)
    own = torch.einsum("ic,if,ig->cfg", p, xa, xa) / m
    h = -torch.einsum("ic,id,if,ig->cfdg", p, p, xa, xa) / m
    h += torch.diag_embed(own.permute(1, 2, 0)).permute(2, 0, 3, 1)
    size = CLASSES * (features + 1)
    order = torch.cat([torch.arange(CLASSES * features).view(CLASSES, features),
                       CLASSES * features + torch.arange(CLASSES)[:, None]], 1).reshape(-1)
    out = torch.empty(size, size, dtype=x.dtype)
    out[order[:, None], order[None, :]] = h.reshape(size, size)
    return out + WEIGHT_DECAY * torch.eye(size, dtype=x.dtype)


def fit(x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The minimizer of ``mean CE(x, y) + (WEIGHT_DECAY/2) ||w||^2`` from ``start``: L-BFGS,
    then Newton steps (``NEWTON_STEPS`` at most, until the gradient's max-norm is below
    ``TOLERANCE``); returns it and that max-norm."""
    w = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=2000, tolerance_grad=TOLERANCE,
                            tolerance_change=1e-15, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits(w, x), y) + WEIGHT_DECAY / 2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    for _ in range(NEWTON_STEPS):
        closure()
        if float(w.grad.abs().max()) < TOLERANCE:
            break
        with torch.no_grad():
            w -= torch.linalg.solve(hessian(w.detach(), x), w.grad)
    closure()
    return w.detach(), float(w.grad.abs().max())


def problem(noise: float, targets: int, config: Config) -> tuple[Problem, float]:
    """Digits split by seed 0, ``noise`` of the train labels flipped, the full fit (and its
    gradient max-norm), and the ``targets`` LDS targets (clean test labels)."""
    s = load_digits({"train": 0.6, "val": 0.2, "test": 0.2}, SEED)
    train, val, test = (np.nonzero(s.split == part)[0] for part in ("train", "val", "test"))
    labels, _ = flip_labels(s.label, noise, CLASSES, train, SEED)
    chosen = np.isin(test, pairwise_targets(config, s.sample_id[test]))
    target = test[chosen]

    def rows(index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(s.x[index]).double(), torch.from_numpy(labels[index])

    (x, y), (vx, vy), (tx, ty) = rows(train), rows(val), rows(target)
    w, residual = fit(x, y, torch.zeros(CLASSES * (x.shape[1] + 1), dtype=torch.float64))
    return Problem(x, y, vx, vy, tx, ty, s.sample_id[target], w), residual


def loo_truth(p: Problem, removals: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(removed rows (k,), U_val(without i) - U_val(full) (k,), worst refit gradient norm)."""
    n = len(p.y)
    removed = np.sort(np.random.default_rng([SEED, 11]).choice(n, removals, replace=False))

    def val_loss(w: torch.Tensor) -> float:
        return float(F.cross_entropy(logits(w, p.val_x), p.val_y, reduction="sum"))

    delta, worst = [], 0.0
    for i in removed:
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        w, residual = fit(p.x[keep], p.y[keep], p.w)
        delta.append(val_loss(w) - val_loss(p.w))
        worst = max(worst, residual)
    return removed, np.array(delta), worst


def lds_truth(p: Problem, subsets: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(membership (M, n) bool, target margins after each refit (M, T), worst gradient norm)."""
    n = len(p.y)
    kept = int(round(0.5 * n))
    membership = np.zeros((subsets, n), dtype=bool)
    outcome = np.zeros((subsets, len(p.target_y)))
    worst = 0.0
    for j in range(subsets):
        membership[j, np.random.default_rng([SEED, 13, j]).choice(n, kept, replace=False)] = True
        keep = torch.from_numpy(membership[j])
        w, residual = fit(p.x[keep], p.y[keep], p.w)
        outcome[j] = margins(logits(w, p.target_x), p.target_y).numpy()
        worst = max(worst, residual)
    return membership, outcome, worst


def contexts(p: Problem, config: Config) -> tuple[ScoringContext, ScoringContext]:
    """(summed validation loss context, pairwise context over the LDS targets with the
    configured measurement), both on a float64 Linear holding ``p.w``."""
    features = p.x.shape[1]
    state = {"weight": p.w[: CLASSES * features].view(CLASSES, features).clone(),
             "bias": p.w[CLASSES * features:].clone()}
    checkpoints = [Checkpoint(index=0, step=1, lr=1.0, load=lambda: state)]

    def factory() -> nn.Module:
        return nn.Linear(features, CLASSES).to(torch.float64)

    def context(tx: torch.Tensor, ty: torch.Tensor, ids: np.ndarray, pairwise: bool):
        target = measurement(config) if pairwise else SummedLoss()
        ctx = ScoringContext(model_factory=factory, checkpoints=checkpoints,
                             train_ids=np.arange(len(p.y), dtype=np.int64), train_x=p.x,
                             train_y=p.y, target_x=tx, target_y=ty, weight_decay=WEIGHT_DECAY,
                             seed=config.seed, target_ids=ids, target=target)
        ctx.gradients = InMemoryGradients.compute(
            factory, checkpoints, ctx.train_ids, p.x, p.y, tx, ty, target_ids=ids, target=target)
        return ctx

    return (context(p.val_x, p.val_y, np.arange(len(p.val_y), dtype=np.int64), False),
            context(p.target_x, p.target_y, p.target_ids, True))


def measure(name: str, damping: float | None, summed: ScoringContext, pairwise: ScoringContext,
            removed: np.ndarray, delta: np.ndarray, membership: np.ndarray,
            outcome: np.ndarray) -> Row:
    """One estimator at one damping (None: its default) against both truths."""
    estimator = make_estimator(name) if damping is None else make_estimator(name, damping=damping)
    started = time.perf_counter()
    attribution = estimator.score(summed)
    train_ids, target_ids, matrix = estimator.pairwise(pairwise)
    seconds = time.perf_counter() - started
    if not (np.array_equal(train_ids, summed.train_ids)
            and np.array_equal(target_ids, pairwise.target_ids)):
        raise RuntimeError(f"{name}: pairwise rows or columns out of order")
    at = np.searchsorted(attribution.sample_ids, removed)
    label = (f"default ({estimator.damping_used:.2e})" if damping is None else f"{damping:g}")
    return Row(name, label, mean_ci(lds(matrix, membership, outcome)),
               loo_correlation(attribution.score[at], delta), seconds)


def table(rows: list[Row]) -> str:
    lines = ["| estimator | damping | LDS [95 % CI] | LOO Pearson | LOO Spearman | seconds "
             "(score + pairwise) | LDS − exact IF's LDS |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mean, low, high = r.lds
        lines.append(f"| {r.estimator} | {r.damping} | {mean:.3f} [{low:.3f}, {high:.3f}] | "
                     f"{r.loo[0]:.3f} | {r.loo[1]:.3f} | {r.seconds:.2f} | {r.vs_exact:+.3f} |")
    return "\n".join(lines)


def _dampings(text: str) -> list[float | None]:
    values = []
    for item in text.split(","):
        value = None if item.strip() == "default" else float(item)
        if value is not None and not value >= 0:
            raise ValueError(f"damping must be 'default' or a number >= 0, got {item!r}")
        values.append(value)
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.damping_convex", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noise", type=float, default=0.2, help="fraction of train labels flipped")
    p.add_argument("--removals", type=int, default=50, help="leave-one-out refits (>= 3)")
    p.add_argument("--subsets", type=int, default=100, help="LDS half-size subsets (>= 3)")
    p.add_argument("--targets", type=int, default=100, help="LDS test targets (>= 1)")
    p.add_argument("--estimators", default="if_exact,if_cg,if_arnoldi")
    p.add_argument("--dampings", type=_dampings, default="default,0,0.01",
                   help="comma-separated: 'default' (relative) and/or absolute values")
    p.add_argument("--measurement", choices=("margin", "loss"), default="margin",
                   help="per-row cost of the pairwise targets (task.measurement)")
    args = p.parse_args(argv)
    if args.removals < 3 or args.subsets < 3 or args.targets < 1 or not 0 <= args.noise < 1:
        p.error("need --removals >= 3, --subsets >= 3, --targets >= 1 and 0 <= --noise < 1")
    names = [name.strip() for name in args.estimators.split(",")]
    damped = [name for name in ESTIMATORS if "damping" in estimator_options(name)]
    if not set(names) <= set(damped):
        p.error(f"--estimators takes estimators with a damping option: {', '.join(damped)}")
    config = Config.model_validate({
        "seed": SEED, "estimators": names, "prune": {"by": names[:1]},
        "task": {"measurement": args.measurement},
        "targets": {"pairwise": True, "test_samples": args.targets},
    })
    torch.set_num_threads(1)
    started = time.perf_counter()
    prob, residual = problem(args.noise, args.targets, config)
    removed, delta, loo_residual = loo_truth(prob, args.removals)
    membership, outcome, lds_residual = lds_truth(prob, args.subsets)
    truth_seconds = time.perf_counter() - started
    summed, pairwise = contexts(prob, config)
    rows = [measure(name, damping, summed, pairwise, removed, delta, membership, outcome)
            for name in names for damping in args.dampings]
    exact = [r for r in rows if (r.estimator, r.damping) == ("if_exact", "0")]
    for r in rows:
        r.vs_exact = r.lds[0] - exact[0].lds[0] if exact else float("nan")
    print(f"converged L2 logistic regression (weight decay {WEIGHT_DECAY:g}), digits, "
          f"n = {len(prob.y)}, d = {prob.w.numel()}, noise {args.noise:g}; "
          f"{args.removals} leave-one-out refits, {args.subsets} half-size subsets x "
          f"{len(prob.target_y)} targets ({args.measurement} attributions, margin outcomes); "
          f"max |grad| at the fits: full {residual:.1e}, LOO {loo_residual:.1e}, "
          f"LDS {lds_residual:.1e}; ground truth {truth_seconds:.0f} s")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
