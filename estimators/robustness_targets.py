"""Adversarial robustness as a target (spec section 8; Chhabra et al., ICLR 2024).

Adversarial target rows are made once at the trained model with FGSM or PGD (L-inf ball of
radius ``eps``) and then frozen: the target is the summed loss on those fixed inputs,
U_rob = sum_v cross_entropy(f(x_adv_v), y_v), with no gradient through the attack. After
retraining, robust accuracy is the accuracy on the same saved inputs (the transfer setting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from estimators.targets import SummedLoss


class AdversarialLoss(SummedLoss):
    """U_rob = sum_v cross_entropy(f(x_adv_v), y_v) (nats). The caller passes the frozen
    adversarial rows as the target inputs; a sum over rows, so per-row gradients are meaningful."""

    name = "robustness"


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0]


def _clip(x: torch.Tensor, clip: tuple[float, float] | None) -> torch.Tensor:
    return x if clip is None else x.clamp(clip[0], clip[1])


def fgsm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
    clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``x + eps * sign(grad_x l(x, y))``, clipped to ``clip`` (the valid input range) when
    given: (m, f), detached. The model is used as given (call eval() first)."""
    return _clip(x + eps * _input_gradient(model, x, y).sign(), clip).detach()


def pgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
    step_size: float | None = None, clip: tuple[float, float] | None = None, seed: int = 0,
) -> torch.Tensor:
    """L-inf PGD: a seeded uniform random start in the eps-ball, then ``steps`` signed-gradient
    ascent steps of ``step_size`` (default eps/4), each projected back onto the ball and
    ``clip``: (m, f), detached. Deterministic for a seed."""
    if eps <= 0 or steps < 1:
        raise ValueError("pgd needs eps > 0 and steps >= 1")
    alpha = eps / 4 if step_size is None else step_size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
    adv = _clip(x + eps * start.to(x.device), clip)
    for _ in range(steps):
        adv = adv + alpha * _input_gradient(model, adv, y).sign()
        adv = _clip(x + (adv - x).clamp(-eps, eps), clip)
    return adv.detach()
