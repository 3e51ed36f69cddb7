"""Two-stage workloads: pretrain an embedding on task A, finetune a new head on task B.

The model is three modules: the shared embedding W (``embed``), the pretraining head Th and
the finetuning head U. Pretraining minimizes ``mean CE(Th(W(x_A)), y_A) + (wd/2)||(W, Th)||^2``;
finetuning either keeps W frozen and minimizes ``mean CE(U(W(x_B)), y_B) + (wd/2)||U||^2``, or
also updates W under the proximal term ``(alpha/2)||W - W_pre||^2``. Both stages train full
batch with L-BFGS in float64 to a tight tolerance, so an optimum (and with it the effect of
removing pretraining samples, warm-started from it) is well defined.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from storage.errors import BadInput
from workloads.datasets import Samples
from workloads.models import seeded_model
from workloads.noise import flip_labels
from workloads.training import lbfgs_iterations, lbfgs_optimizer

FinetuneMode = Literal["frozen", "proximal"]


@dataclass(frozen=True)
class TwoStageModel:
    """W (features), Th (pretraining logits from W's output), U (finetuning logits)."""

    embed: nn.Module
    pretrain_head: nn.Module
    finetune_head: nn.Module

    def pretrain_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.pretrain_head(self.embed(x))

    def finetune_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.finetune_head(self.embed(x))

    def copy(self) -> TwoStageModel:
        return TwoStageModel(*(copy.deepcopy(m) for m in
                               (self.embed, self.pretrain_head, self.finetune_head)))

    def state(self) -> dict[str, torch.Tensor]:
        """One state_dict: keys prefixed ``embed.``, ``pretrain_head.``, ``finetune_head.``."""
        return {f"{name}.{k}": v.detach().clone() for name, module in self._parts()
                for k, v in module.state_dict().items()}

    def load(self, state: dict[str, torch.Tensor]) -> TwoStageModel:
        for name, module in self._parts():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                    if k.startswith(prefix)})
        return self

    def _parts(self) -> list[tuple[str, nn.Module]]:
        return [("embed", self.embed), ("pretrain_head", self.pretrain_head),
                ("finetune_head", self.finetune_head)]


def two_stage_mlp(input_dim: int, hidden: int, pretrain_classes: int, finetune_classes: int,
                  seed: int) -> TwoStageModel:
    """Embedding ``tanh(Linear(input_dim, hidden))`` and two linear heads, float64, seeded."""
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh()),
            nn.Linear(hidden, pretrain_classes),
            nn.Linear(hidden, finetune_classes),
        ).to(torch.float64)

    embed, pretrain_head, finetune_head = seeded_model(build, seed)
    return TwoStageModel(embed, pretrain_head, finetune_head)


@dataclass(frozen=True)
class TaskData:
    """One task's rows: x (n, f) float64, y (n,) int64 relabeled 0..C-1, ids (n,) sample ids."""

    x: torch.Tensor
    y: torch.Tensor
    ids: np.ndarray

    def without(self, removed: np.ndarray) -> TaskData:
        keep = ~np.isin(self.ids, removed)
        rows = torch.from_numpy(np.flatnonzero(keep))
        return TaskData(self.x[rows], self.y[rows], self.ids[keep])


def split_tasks(samples: Samples, pretrain_classes: list[int],
                finetune_classes: list[int]) -> tuple[Samples, np.ndarray]:
    """``samples`` restricted to both tasks' classes, each relabeled 0..C-1 within its task,
    and each kept sample's task (n,), 'pretrain' or 'finetune'. The task of a sample is its
    clean class. BadInput when a class has no samples."""
    truth = samples.clean_label if samples.clean_label is not None else samples.label
    missing = sorted((set(pretrain_classes) | set(finetune_classes)) - set(truth.tolist()))
    if missing:
        raise BadInput(f"multistage: the data has no samples of class(es) {missing}")
    in_a = np.isin(truth, pretrain_classes)
    rows = np.flatnonzero(in_a | np.isin(truth, finetune_classes))
    lookup = {c: i for i, c in enumerate(pretrain_classes)}
    lookup |= {c: i for i, c in enumerate(finetune_classes)}
    relabel = np.vectorize(lookup.__getitem__, otypes=[np.int64])
    kept = replace(
        samples,
        sample_id=samples.sample_id[rows],
        inputs={name: col[rows] for name, col in samples.inputs.items()},
        label=relabel(truth[rows]),
        split=samples.split[rows],
        num_classes=max(len(pretrain_classes), len(finetune_classes)),
        clean_label=relabel(truth[rows]),
        corrupted=np.zeros(len(rows), dtype=bool),
        group=None if samples.group is None else samples.group[rows],
    )
    return kept, np.where(in_a[rows], "pretrain", "finetune")


def noisy_pretraining(samples: Samples, task: np.ndarray, rate: float, seed: int) -> Samples:
    """Flip ``rate`` of the pretraining train labels to another pretraining class (the
    finetuning data stays clean); ``corrupted`` marks the flipped samples."""
    candidates = np.flatnonzero((task == "pretrain") & (samples.split == "train"))
    classes = int(samples.label[task == "pretrain"].max()) + 1
    noisy, corrupted = flip_labels(samples.label, rate, classes, candidates, seed)
    return samples.with_labels(noisy, samples.clean_label, corrupted)


def task_rows(samples: Samples, task: np.ndarray, name: str, split: str) -> TaskData:
    """The rows of task ``name`` ('pretrain' | 'finetune') in ``split``; ``task`` (n,) names
    each sample's task. Finetune val/test use clean labels."""
    rows = np.flatnonzero((task == name) & (samples.split == split))
    labels = samples.label if name == "pretrain" or samples.clean_label is None \
        else samples.clean_label
    return TaskData(torch.from_numpy(samples.x[rows]).to(torch.float64),
                    torch.from_numpy(labels[rows]), samples.sample_id[rows])


def _lbfgs(params: list[nn.Parameter], objective, max_iter: int, tol: float) -> int:
    """Minimize ``objective()`` over ``params`` with full-batch L-BFGS; returns iterations."""
    opt = lbfgs_optimizer(params, max_iter, tol)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    return lbfgs_iterations(opt)


def _squared_norm(modules: list[nn.Module]) -> torch.Tensor:
    return sum((p * p).sum() for m in modules for p in m.parameters())


@dataclass(frozen=True)
class TwoStageRecipe:
    """How both stages train: the finetuning ``mode`` and ``proximal`` (alpha), the weight
    decays (coefficients of (1/2)||.||^2), and L-BFGS's iteration cap and gradient tolerance."""

    mode: FinetuneMode = "frozen"
    proximal: float = 1.0
    pretrain_weight_decay: float = 1e-2
    finetune_weight_decay: float = 1e-3
    max_iter: int = 2000
    tolerance: float = 1e-9


def pretrain(model: TwoStageModel, data: TaskData, recipe: TwoStageRecipe) -> int:
    """Fit W and Th in place (from their current values); returns L-BFGS iterations."""
    parts = [model.embed, model.pretrain_head]

    def objective() -> torch.Tensor:
        loss = F.cross_entropy(model.pretrain_logits(data.x), data.y)
        return loss + 0.5 * recipe.pretrain_weight_decay * _squared_norm(parts)

    params = [p for m in parts for p in m.parameters()]
    return _lbfgs(params, objective, recipe.max_iter, recipe.tolerance)


def finetune(model: TwoStageModel, data: TaskData, recipe: TwoStageRecipe,
             anchor: nn.Module | None = None) -> int:
    """Fit U (and, when ``recipe.mode='proximal'``, W under ``(alpha/2)||W - W_pt||^2``) in
    place, from the current values; returns L-BFGS iterations. ``anchor`` holds W_pt
    (default: the embedding as it is now, i.e. just pretrained)."""
    pinned = [p.detach().clone() for p in (anchor or model.embed).parameters()]
    update_embed = recipe.mode == "proximal"

    def objective() -> torch.Tensor:
        if update_embed:
            logits = model.finetune_logits(data.x)
        else:
            with torch.no_grad():
                features = model.embed(data.x)
            logits = model.finetune_head(features)
        loss = F.cross_entropy(logits, data.y)
        loss = loss + 0.5 * recipe.finetune_weight_decay * _squared_norm([model.finetune_head])
        if update_embed:
            drift = sum(((p - a) ** 2).sum()
                        for p, a in zip(model.embed.parameters(), pinned, strict=True))
            loss = loss + 0.5 * recipe.proximal * drift
        return loss

    params = list(model.finetune_head.parameters())
    if update_embed:
        params += list(model.embed.parameters())
    return _lbfgs(params, objective, recipe.max_iter, recipe.tolerance)


def fit(model: TwoStageModel, pretraining: TaskData, finetuning: TaskData,
        recipe: TwoStageRecipe) -> tuple[TwoStageModel, int, int]:
    """Pretrain, then finetune ``model`` in place; returns (a copy of the pretrained model,
    pretraining iterations, finetuning iterations)."""
    pretrain_iters = pretrain(model, pretraining, recipe)
    pretrained = model.copy()
    return pretrained, pretrain_iters, finetune(model, finetuning, recipe)


def refit_warm(pretrained: TwoStageModel, finetuned: TwoStageModel, pretraining: TaskData,
               finetuning: TaskData, recipe: TwoStageRecipe) -> TwoStageModel:
    """Re-pretrain from the pretrained optimum on ``pretraining`` (e.g. with samples removed),
    then re-finetune from the finetuned optimum (W shifted by the change of W_pt in the
    proximal case): the counterfactual the influence function linearizes. A new model."""
    model = pretrained.copy()
    pretrain(model, pretraining, recipe)
    anchor = copy.deepcopy(model.embed)
    model.finetune_head.load_state_dict(finetuned.finetune_head.state_dict())
    if recipe.mode == "proximal":
        with torch.no_grad():
            for p, old, ft in zip(model.embed.parameters(), pretrained.embed.parameters(),
                                  finetuned.embed.parameters(), strict=True):
                p.add_(ft - old)
    finetune(model, finetuning, recipe, anchor=anchor)
    return model


@torch.no_grad()
def finetune_metrics(model: TwoStageModel, data: TaskData) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the finetuned model on ``data``."""
    logits = model.finetune_logits(data.x)
    return (float(F.cross_entropy(logits, data.y)),
            float((logits.argmax(1) == data.y).double().mean()))


@torch.no_grad()
def pretrain_accuracy(model: TwoStageModel, data: TaskData) -> float:
    return float((model.pretrain_logits(data.x).argmax(1) == data.y).double().mean())
