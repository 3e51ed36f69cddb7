"""Targets: the cost U(theta) whose change a training sample's score predicts.

An estimator scores against ``grad U``. The summed loss is the default; fairness and robustness
utilities plug in as other ``Target`` subclasses (a cost over target rows, lower is better).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn


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
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int = 1024
    ) -> torch.Tensor:
        """grad_theta U: (d,), float64, in parameter order (the model as given: call eval())."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.decomposable:
            total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64,
                                device=x.device)
            for start in range(0, x.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                grads = torch.autograd.grad(self.cost(model(x[rows]), y[rows]), params)
                total += torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)
            return total
        grads = torch.autograd.grad(self.cost(model(x), y), params)
        return torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)


class SummedLoss(Target):
    """U = sum_v cross_entropy(f(x_v), y_v) (nats), the default target."""

    name = "loss"
    decomposable = True

    def cost(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="sum")
