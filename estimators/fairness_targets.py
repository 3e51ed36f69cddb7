"""Fairness utilities as targets (spec section 8; Chhabra et al., ICLR 2024), binary tasks.

Each is a cost U(theta) over the target rows (lower = fairer) built from soft, differentiable
surrogates of the hard gaps. ``group`` (m,) is the binary protected attribute s of the target
rows (1 = the group the surrogate treats as advantaged), ``p`` the predicted probability of the
positive class 1, ``l`` the per-row cross-entropy. The signed surrogates of the source only help
when their gap is positive, so the project uses their absolute value: grad |U| =
sign(U(theta)) grad U (autograd of ``abs``; 0 at an exact tie).

- demographic parity:  U = | mean_{s=1} p - mean_{s=0} p |
- equal opportunity:   U = | mean_{s=0,y=1} l - mean_{s=1,y=1} l |
- equalized odds:      U = | mean_{s=1,y=1} p - mean_{s=0,y=1} p |
                         + | mean_{s=1,y=0} p - mean_{s=0,y=0} p |   (project extension)

None is a sum over rows (``decomposable = False``): single rows have no fairness meaning.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from estimators.targets import Target


class _GroupTarget(Target):
    """A non-decomposable cost over target rows with a binary protected attribute."""

    decomposable = False

    def __init__(self, group: torch.Tensor | np.ndarray) -> None:
        group = torch.as_tensor(np.asarray(group)).to(torch.long)
        if group.ndim != 1 or not bool(((group == 0) | (group == 1)).all()):
            raise ValueError("group must be a 1-d array of 0/1 (the protected attribute)")
        if group.unique().numel() < 2:
            raise ValueError("the target rows hold only one protected group; a gap needs two")
        self.group = group

    def _check(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.shape[0] != self.group.shape[0]:
            raise ValueError(
                f"{self.name} needs all {self.group.shape[0]} target rows at once, "
                f"got {logits.shape[0]}"
            )
        if logits.shape[1] != 2:
            raise ValueError(f"{self.name} needs a binary classifier, got {logits.shape[1]} "
                             "classes")
        return self.group.to(logits.device) == 1, self.group.to(logits.device) == 0


def _mean_over(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the boolean ``rows`` (0 when empty, keeping the graph)."""
    count = rows.sum()
    return (values * rows).sum() / count.clamp(min=1)


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """p(y=1 | x) per row: (m,), from logits (m, 2)."""
    return torch.softmax(logits, dim=1)[:, 1]


class DemographicParity(_GroupTarget):
    """U = |mean_{s=1} p - mean_{s=0} p| (probability units, in [0, 1])."""

    name = "demographic_parity"

    def cost(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s1, s0 = self._check(logits)
        p = positive_probability(logits)
        return (_mean_over(p, s1) - _mean_over(p, s0)).abs()


class EqualOpportunity(_GroupTarget):
    """U = |mean_{s=0,y=1} l - mean_{s=1,y=1} l| (nats): the loss gap on positive rows."""

    name = "equal_opportunity"

    def cost(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s1, s0 = self._check(logits)
        loss = F.cross_entropy(logits, y, reduction="none")
        positive = y == 1
        return (_mean_over(loss, s0 & positive) - _mean_over(loss, s1 & positive)).abs()


class EqualizedOdds(_GroupTarget):
    """U = |gap of mean p on y=1| + |gap of mean p on y=0| (probability units, in [0, 2])."""

    name = "equalized_odds"

    def cost(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s1, s0 = self._check(logits)
        p = positive_probability(logits)
        total = logits.new_zeros(())
        for label in (1, 0):
            rows = y == label
            total = total + (_mean_over(p, s1 & rows) - _mean_over(p, s0 & rows)).abs()
        return total


FAIRNESS_TARGETS: dict[str, type[_GroupTarget]] = {
    cls.name: cls for cls in (DemographicParity, EqualOpportunity, EqualizedOdds)
}


def fairness_gaps(pred: np.ndarray, y: np.ndarray, group: np.ndarray) -> dict[str, float]:
    """Hard-prediction gaps on a labelled set, each in [0, 1] (equalized odds in [0, 2]):
    ``dp_gap`` = |P(yhat=1|s=1) - P(yhat=1|s=0)|, ``eop_gap`` = the true-positive-rate gap,
    ``eo_gap`` = TPR gap + false-positive-rate gap. NaN where a cell is empty."""
    pred, y, group = (np.asarray(a) for a in (pred, y, group))

    def rate(rows: np.ndarray) -> float:
        return float(pred[rows].mean()) if rows.any() else float("nan")

    def gap(rows: np.ndarray) -> float:
        return abs(rate(rows & (group == 1)) - rate(rows & (group == 0)))

    everyone = np.ones_like(group, dtype=bool)
    tpr, fpr = gap(y == 1), gap(y == 0)
    return {"dp_gap": gap(everyone), "eop_gap": tpr, "eo_gap": tpr + fpr}
