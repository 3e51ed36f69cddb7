"""Deterministic minibatch training with checkpoint capture."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workloads.inputs import Inputs, call_model, cast_floating, take

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits (m, C), labels (m,)) -> the mean loss of the batch, a scalar."""


LBFGS_ITERATIONS = 100
"""L-BFGS iterations an ``lbfgs`` epoch runs at most (it stops sooner once converged)."""

LBFGS_TOLERANCE = 1e-9
"""L-BFGS stops when the largest entry of the objective's gradient is at most this (float64)."""

LBFGS_CHUNK = 1024
"""Rows an ``lbfgs`` objective evaluates at once (its loss and gradient are summed over these)."""


@dataclass(frozen=True)
class Recipe:
    """How to train. lr schedule per step: constant, step (x gamma every step_epochs), cosine
    (to 0 at the last step). weight_decay is the coefficient of (1/2)||theta||^2.
    ``optimizer="lbfgs"`` fits to convergence instead (``train``): lr, momentum, schedule and
    batch_size do not apply."""

    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-3
    schedule: str = "cosine"
    step_epochs: int = 10
    gamma: float = 0.1

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        total = self.epochs * steps_per_epoch
        if self.schedule == "cosine":
            return 0.5 * self.lr * (1 + math.cos(math.pi * step / total))
        if self.schedule == "step":
            return self.lr * self.gamma ** ((step // steps_per_epoch) // self.step_epochs)
        return self.lr


@dataclass(frozen=True)
class CheckpointEvent:
    """Emitted after ``epoch`` (1-based) ends; ``lr`` is the mean lr since the previous one,
    ``step_lr`` the lr of the last step."""

    index: int
    step: int
    epoch: float
    lr: float
    state_dict: dict[str, torch.Tensor]
    step_lr: float


def checkpoint_epochs(epochs: int, count: int) -> list[int]:
    """``count`` epochs, evenly spaced, the last one always included."""
    count = max(1, min(count, epochs))
    return sorted({round(epochs * (i + 1) / count) for i in range(count)})


def train(
    model: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    recipe: Recipe,
    seed: int,
    checkpoints: int = 1,
    on_checkpoint: Callable[[CheckpointEvent], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    keep: np.ndarray | None = None,
    loss_fn: LossFn = F.cross_entropy,
) -> list[float]:
    """Train ``model`` in place on (x (n rows of inputs, ``workloads.inputs``), y (n,));
    returns the loss of every step. ``loss_fn(logits, labels)``: the mean loss of a batch.

    Deterministic given ``seed`` (data order) and the model's initial state. ``keep`` (n,) bool
    drops samples while keeping everything else fixed: the same data order and batches (a
    batch loses its dropped rows; one left empty is skipped), the same lr schedule. That is
    the counterfactual "same run without these samples" used for ground truth.

    ``recipe.optimizer="lbfgs"``: full-batch L-BFGS (strong-Wolfe line search, history 50) on
    ``mean loss over the kept rows + (weight_decay/2) ||theta||^2``, in float64 on a float64
    copy of the model in eval mode (a deterministic objective), each epoch up to
    ``LBFGS_ITERATIONS`` iterations, stopping once the gradient's largest entry is at most
    ``LBFGS_TOLERANCE``; the model gets the fit in its own dtype after every epoch. One loss
    per epoch is returned; a checkpoint's lr is 1 (L-BFGS's step scale) and its step the
    iterations so far. A convex model reaches its unique optimum whatever the seed.
    """
    if recipe.optimizer == "lbfgs":
        return _fit_lbfgs(model, x, y, recipe, checkpoints, on_checkpoint, on_epoch, keep,
                          loss_fn)
    n = len(y)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
        )
    rng = np.random.default_rng(seed)
    save_at = set(checkpoint_epochs(recipe.epochs, checkpoints))
    losses: list[float] = []
    lrs_since: list[float] = []
    step = 0
    saved = 0
    model.train()
    for epoch in range(1, recipe.epochs + 1):
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            if keep is not None:
                idx = idx[torch.from_numpy(keep[idx.numpy()])]
            lr = recipe.lr_at(step, steps_per_epoch)
            if len(idx) == 0:
                step += 1
                continue
            for group in opt.param_groups:
                group["lr"] = lr
            loss = loss_fn(call_model(model, take(x, idx)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            lrs_since.append(lr)
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, float(np.mean(losses[-steps_per_epoch:])))
        if epoch in save_at and on_checkpoint is not None:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            on_checkpoint(CheckpointEvent(saved, step, float(epoch), float(np.mean(lrs_since)),
                                          state, lrs_since[-1]))
            saved += 1
            lrs_since = []
    model.eval()
    return losses


def lbfgs_optimizer(
    params: list[nn.Parameter], max_iter: int, tolerance: float
) -> torch.optim.LBFGS:
    """Full-batch L-BFGS over ``params``: step size 1, strong-Wolfe line search, history 50,
    at most ``max_iter`` iterations per ``step``, stopping at a gradient max-entry of
    ``tolerance``. Its ``step(closure)`` keeps its history from one call to the next."""
    return torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=50,
                             tolerance_grad=tolerance, tolerance_change=1e-15,
                             line_search_fn="strong_wolfe")


def lbfgs_iterations(opt: torch.optim.LBFGS) -> int:
    """Iterations ``opt`` has run over all its ``step`` calls."""
    return int(opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0))


def _fit_lbfgs(
    model: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    recipe: Recipe,
    checkpoints: int,
    on_checkpoint: Callable[[CheckpointEvent], None] | None,
    on_epoch: Callable[[int, float], None] | None,
    keep: np.ndarray | None,
    loss_fn: LossFn,
) -> list[float]:
    """``train`` with ``recipe.optimizer="lbfgs"`` (its docstring)."""
    rows = np.arange(len(y)) if keep is None else np.flatnonzero(keep)
    if len(rows) == 0:
        raise ValueError("lbfgs training needs at least one kept row")
    chunks = [torch.from_numpy(rows[s : s + LBFGS_CHUNK])
              for s in range(0, len(rows), LBFGS_CHUNK)]
    fit = copy.deepcopy(model).to(torch.float64).eval()
    x64 = cast_floating(x, torch.float64)
    params = [p for p in fit.parameters() if p.requires_grad]
    opt = lbfgs_optimizer(params, LBFGS_ITERATIONS, LBFGS_TOLERANCE)

    def data_loss(backward: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=y.device)
        for idx in chunks:
            loss = loss_fn(call_model(fit, take(x64, idx)), y[idx]) * (len(idx) / len(rows))
            if backward:
                loss.backward()
            total += loss.detach()
        return total

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        penalty = 0.5 * recipe.weight_decay * sum((p * p).sum() for p in params)
        penalty.backward()
        return data_loss(backward=True) + penalty.detach()

    save_at = set(checkpoint_epochs(recipe.epochs, checkpoints))
    losses: list[float] = []
    saved = 0
    for epoch in range(1, recipe.epochs + 1):
        opt.step(closure)
        with torch.no_grad():
            for target, fitted in zip(model.parameters(), fit.parameters(), strict=True):
                target.copy_(fitted)
            losses.append(float(data_loss(backward=False)))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
        if epoch in save_at and on_checkpoint is not None:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            on_checkpoint(CheckpointEvent(saved, lbfgs_iterations(opt), float(epoch), 1.0,
                                          state, 1.0))
            saved += 1
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: Inputs, y: torch.Tensor, batch: int = 1024) -> float:
    """The share of rows whose arg-max logit is the label (evaluated ``batch`` rows at a time)."""
    model.eval()
    right = sum(int((call_model(model, take(x, slice(s, s + batch))).argmax(dim=1)
                     == y[s : s + batch]).sum()) for s in range(0, len(y), batch))
    return right / len(y) if len(y) else float("nan")
