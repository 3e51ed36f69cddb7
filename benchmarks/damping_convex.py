"""Damping on a convex model trained to convergence: exact leave-one-out against if_exact.

    python -m benchmarks.damping_convex [--noise 0.2] [--removals 50]

Digits as Sieve splits it (seed 0, 20 % flipped labels by default), an L2 logistic regression
(weight decay 1e-3) fitted by L-BFGS in float64 to a gradient norm of 1e-12, and the exact
leave-one-out change of the summed validation loss for ``--removals`` training samples (each
refit warm-started from the full fit). if_exact's score ``g_z (C + (wd + damping) I)^-1 g_V``
with C the GGN (``estimators.influence.curvature_matrix``) is correlated with it for damping 0,
the relative default (``estimators.damping``), 1e-3 and the old default 0.01. This is the
setting in which the undamped influence function is exact, so the default should stay close
to damping 0 here (issue 15).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr

from estimators.damping import mean_eigenvalue, relative_damping
from estimators.influence import curvature_matrix
from workloads.datasets import load_digits
from workloads.noise import flip_labels

WEIGHT_DECAY = 1e-3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.damping_convex", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--removals", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s = load_digits({"train": 0.6, "val": 0.2, "test": 0.2}, 0)
    train, val = np.nonzero(s.split == "train")[0], np.nonzero(s.split == "val")[0]
    labels, _ = flip_labels(s.label, args.noise, 10, train, 0)
    x, y = torch.from_numpy(s.x[train]).double(), torch.from_numpy(labels[train])
    xv, yv = torch.from_numpy(s.x[val]).double(), torch.from_numpy(labels[val])
    n, features = x.shape
    d = 10 * features + 10

    def logits(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return rows @ w[: 10 * features].view(10, features).T + w[10 * features:]

    def fit(keep: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        w = (torch.zeros(d, dtype=torch.float64) if start is None else start.clone())
        w.requires_grad_(True)
        opt = torch.optim.LBFGS([w], lr=1, max_iter=2000, tolerance_grad=1e-12,
                                tolerance_change=1e-15, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (F.cross_entropy(logits(w, x[keep]), y[keep], reduction="sum") / n
                    + WEIGHT_DECAY / 2 * (w * w).sum())
            loss.backward()
            return loss

        for _ in range(5):
            opt.step(closure)
        return w.detach()

    def val_loss(w: torch.Tensor) -> float:
        return float(F.cross_entropy(logits(w, xv), yv, reduction="sum"))

    everyone = torch.ones(n, dtype=torch.bool)
    w = fit(everyone)
    removed = np.random.default_rng(0).choice(n, args.removals, replace=False)
    delta = []
    for i in removed:
        keep = everyone.clone()
        keep[i] = False
        delta.append(val_loss(fit(keep, w)) - val_loss(w))
    model = torch.nn.Linear(features, 10)
    with torch.no_grad():
        model.weight.copy_(w[: 10 * features].view(10, features))
        model.bias.copy_(w[10 * features:])
    curvature = curvature_matrix(model, x.float(), y)

    def gradients(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        r = torch.softmax(logits(w, rows), 1)
        r[torch.arange(len(labels)), labels] -= 1
        return torch.cat([(r[:, :, None] * rows[:, None, :]).reshape(len(labels), -1), r], 1)

    g, g_v = gradients(x, y), gradients(xv, yv).sum(0)
    relative = relative_damping(mean_eigenvalue(lambda v: curvature @ v, d, 0))
    print(f"converged L2 logistic regression, digits, noise {args.noise}, "
          f"{args.removals} exact leave-one-out refits")
    for name, damping in [("0", 0.0), (f"relative ({relative:.2e})", relative),
                          ("1e-3", 1e-3), ("0.01", 0.01)]:
        a = curvature + (WEIGHT_DECAY + damping) * torch.eye(d, dtype=torch.float64)
        score = (g[removed] @ torch.linalg.solve(a, g_v)).numpy()
        print(f"  damping {name}: LOO Pearson {pearsonr(score, delta)[0]:.3f}, "
              f"Spearman {spearmanr(score, delta)[0]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
