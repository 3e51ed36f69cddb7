"""Targets: the cost U(theta) whose change a training sample's score predicts.

An estimator scores against ``grad U``. The summed loss is the default; fairness and robustness
utilities plug in as other ``Target`` subclasses (a cost over target rows, lower is better).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workloads.inputs import Inputs, call_model, num_rows, take


class Target(ABC):
    """A differentiable cost over the target rows; lower is better (sign rule of §0).

    ``decomposable``: U is a sum of per-row costs, so per-sample target gradients (stored
    shards) sum to grad U and single rows are meaningful targets (pairwise attributions).
    """

    name: str
    decomposable: bool

    @abstractmethod
    def cost(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """U from the model's logits (m, C) and labels (m,): a scalar."""

    def gradient(
        self, model: nn.Module, x: Inputs, y: torch.Tensor, chunk_size: int = 1024
    ) -> torch.Tensor:
        """grad_theta U over the trainable parameters: (d,), float64, in parameter order (the
        model as given: call eval()); ``x``: the target rows' inputs (``workloads.inputs``)."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.decomposable:
            total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64,
                                device=y.device)
            for start in range(0, num_rows(x), chunk_size):
                rows = slice(start, start + chunk_size)
                cost = self.cost(call_model(model, take(x, rows)), y[rows])
                grads = torch.autograd.grad(cost, params)
                total += torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)
            return total
        grads = torch.autograd.grad(self.cost(call_model(model, x), y), params)
        return torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)


class SummedLoss(Target):
    """U = sum_v cross_entropy(f(x_v), y_v) (nats), the default target."""

    name = "loss"
    decomposable = True

    def cost(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="sum")


class MarginTarget(Target):
    """U = -sum_v margin(f(x_v), y_v) (``estimators.trak.margins``: the correct logit minus the
    log-sum-exp of the others): a larger margin is better, so its negative is the cost."""

    name = "margin"
    decomposable = True

    def cost(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        own = torch.arange(logits.shape[1], device=logits.device) == y.unsqueeze(1)
        correct = (logits * own).sum(dim=1)
        others = logits.masked_fill(own, float("-inf")).logsumexp(dim=1)
        return (others - correct).sum()


class MeasuredCost(Target):
    """U = sum_v fn(f(x_v), y_v), a user's per-row cost ``fn(logits (m, C), labels (m,)) ->
    (m,)`` (lower is better)."""

    decomposable = True

    def __init__(self, name: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.name = name
        self.fn = fn

    def cost(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(logits, y).sum()
