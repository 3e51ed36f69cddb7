"""Multi-stage influence (spec §7) against actual re-pretraining + re-finetuning.

The tiny case is convex in each stage: the embedding W is a multinomial logistic regression on
task A (no pretraining head), the finetuning head U a logistic regression on W's logits for task
B. Every refit is run to a gradient tolerance of 1e-11, so the leave-one-out truth is exact up to
the influence function's own (second-order) error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from torch import nn

from estimators.multistage import Finetuning, multistage_influence, pretrain_loss_baseline
from workloads.two_stage import TaskData, TwoStageModel, TwoStageRecipe, fit, refit_warm

PRETRAIN_WD = 0.05


def _task(n: int, classes: int, seed: int, offset: int) -> TaskData:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, 4, generator=gen, dtype=torch.float64) * 1.5
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return TaskData(x, y, np.arange(offset, offset + n))


@pytest.fixture(scope="module")
def tasks() -> dict[str, TaskData]:
    pretraining = _task(60, 3, 0, 0)
    # task B: two classes whose centers share task A's geometry, plus noise in the labels
    b = _task(100, 3, 0, 1000)
    y = (b.y == 0).long()
    y[::9] = 1 - y[::9]
    finetuning = TaskData(b.x[:50], y[:50], b.ids[:50])
    target = TaskData(b.x[50:], y[50:], b.ids[50:])
    return {"pretraining": pretraining, "finetuning": finetuning, "target": target}


def _model() -> TwoStageModel:
    torch.manual_seed(0)
    return TwoStageModel(nn.Linear(4, 3).double(), nn.Identity(), nn.Linear(3, 2).double())


def _recipe(mode: str) -> TwoStageRecipe:
    return TwoStageRecipe(mode, proximal=0.5, pretrain_weight_decay=PRETRAIN_WD,
                          finetune_weight_decay=1e-2, tolerance=1e-11)


def _scores(tasks, mode: str, solver: str = "exact"):
    recipe = _recipe(mode)
    finetuned = _model()
    pretrained, _, _ = fit(finetuned, tasks["pretraining"], tasks["finetuning"], recipe)
    d = tasks
    result = multistage_influence(
        pretrained.embed, pretrained.pretrain_head, finetuned.embed, finetuned.finetune_head,
        (d["pretraining"].x, d["pretraining"].y), (d["finetuning"].x, d["finetuning"].y),
        (d["target"].x, d["target"].y),
        Finetuning(mode, recipe.proximal, recipe.finetune_weight_decay), PRETRAIN_WD, solver,
    )
    return result, pretrained, finetuned


def _target_loss(model: TwoStageModel, data: TaskData) -> float:
    with torch.no_grad():
        logits = model.finetune_logits(data.x)
        return float(torch.nn.functional.cross_entropy(logits, data.y, reduction="sum"))


@pytest.mark.parametrize("mode", ["frozen", "proximal"])
def test_scores_predict_leave_one_out_refits(tasks, mode):
    result, pretrained, finetuned = _scores(tasks, mode)
    pre = tasks["pretraining"]
    m = len(pre.y)
    base = _target_loss(finetuned, tasks["target"])
    rows = np.arange(0, m, 2)
    actual = np.array([
        m * (_target_loss(refit_warm(pretrained, finetuned, pre.without(pre.ids[[i]]),
                                     tasks["finetuning"], _recipe(mode)), tasks["target"]) - base)
        for i in rows
    ])
    predicted = result.score[rows]
    assert pearsonr(predicted, actual)[0] > 0.95
    # positive slope of about 1: score ~ m * (target loss without a - with a)
    slope = np.polyfit(predicted, actual, 1)[0]
    assert 0.7 < slope < 1.4, slope
    # the most harmful (most negative) sample is harmful in fact: removing it lowers the loss
    assert actual[np.argmin(predicted)] < 0
    assert pearsonr(pretrain_loss_baseline(result)[rows], actual)[0] < 0.95


def test_conjugate_gradients_match_the_exact_solve(tasks):
    exact, _, _ = _scores(tasks, "proximal", "exact")
    cg, _, _ = _scores(tasks, "proximal", "cg")
    assert cg.solver_residual < 1e-8
    scale = np.abs(exact.score).max()
    np.testing.assert_allclose(cg.score, exact.score, rtol=1e-6, atol=1e-6 * scale)


def test_the_baseline_ranks_high_pretraining_loss_as_harmful(tasks):
    result, _, _ = _scores(tasks, "frozen")
    baseline = pretrain_loss_baseline(result)
    assert np.argmin(baseline) == np.argmax(result.pretrain_loss)
    assert (baseline <= 0).all()


def test_unknown_finetuning_mode_is_refused(tasks):
    with pytest.raises(ValueError, match="unknown finetuning mode"):
        _scores(tasks, "sideways")
