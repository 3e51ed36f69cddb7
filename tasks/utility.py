"""The utility a run scores against (``targets.utility``, docs/utilities.md) and what it measures.

- ``loss``: the summed cross-entropy of the ``targets.split`` rows (the default).
- fairness (``demographic_parity``, ``equal_opportunity``, ``equalized_odds``): an absolute-gap
  surrogate over the target rows; needs binary labels and a binary ``group`` column.
- ``robustness``: the summed loss on adversarial versions of the target rows, made once at the
  trained model (stage ``attack``), saved to ``adversarial/split=<s>/part-0.parquet`` and frozen.

For a utility other than ``loss`` the gradient stage stores grad U under the pseudo split
``<split>_<utility>`` (one row with sample_id -1 for a fairness gap; one row per adversarial
target row for robustness), so every stored-gradient estimator reads grad U as its target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from torch import nn

from estimators.fairness_targets import FAIRNESS_TARGETS, fairness_gaps
from estimators.per_sample import RowCost, per_sample_gradients
from estimators.robustness_targets import AdversarialLoss, fgsm, pgd
from estimators.targets import MarginTarget, MeasuredCost, SummedLoss, Target
from storage.atomic import read_parquet_table, write_parquet_atomic
from storage.checkpoints import CheckpointRecord, load_state_dict
from storage.errors import BadInput
from storage.store import RunPaths
from storage.tracking import Tracking
from tasks.config import Config
from tasks.stage import stage
from tasks.workload import Workload, load_workload
from workloads.datasets import Samples
from workloads.inputs import Inputs, call_model, take, to_device
from workloads.task import resolve_hook, training_loss
from workloads.training import accuracy

FAIRNESS_ID = -1
"""sample_id of the single stored row holding a fairness target's gradient."""


def utility_split(config: Config) -> str:
    """The gradient pseudo split holding grad U (the plain split for ``loss``)."""
    u = config.targets.utility
    return config.targets.split if u == "loss" else f"{config.targets.split}_{u}"


def has_binary_groups(samples: Samples) -> bool:
    return (samples.group is not None and samples.num_classes == 2
            and set(np.unique(samples.group).tolist()) == {0, 1})


def check_utility(config: Config, samples: Samples) -> None:
    """BadInput when the data can't support the configured utility or deletion grouping."""
    u = config.targets.utility
    if u in FAIRNESS_TARGETS and not has_binary_groups(samples):
        raise BadInput(f"targets.utility {u} needs binary labels and a 0/1 group column "
                       "(e.g. data.name german_credit, or a parquet with a group column)")
    if u == "robustness" and (len(samples.inputs) != 1 or not np.issubdtype(
            samples.x.dtype, np.floating)):
        raise BadInput("targets.utility robustness perturbs one floating input column; the data "
                       f"has {list(samples.inputs)}")
    if config.deletion.by == "group" and samples.group is None:
        raise BadInput("deletion.by group needs a group column in the data")


def make_target(config: Config, work: Workload, rows: np.ndarray) -> Target:
    """The configured cost over the target ``rows`` (indices into the workload)."""
    u = config.targets.utility
    if u in FAIRNESS_TARGETS:
        return FAIRNESS_TARGETS[u](work.samples.group[rows])
    return AdversarialLoss() if u == "robustness" else measurement(config)


def measurement(config: Config) -> Target:
    """The summed per-sample measurement of target rows (``task.measurement``): the loss, minus
    the margin, or a user's per-row cost."""
    spec = config.task.measurement
    if spec == "loss":
        return SummedLoss()
    if spec == "margin":
        return MarginTarget()
    return MeasuredCost(spec, resolve_hook(spec, "task.measurement"))


def row_cost(config: Config, split: str) -> RowCost | None:
    """The cost whose per-sample gradients the gradient stage stores for ``split``: the
    training loss (``task.loss``) for train, the measurement for the others; None for the
    cross-entropy (the closed-form route of ``per_sample_gradients``)."""
    if split == "train":
        return None if config.task.loss is None else training_loss(config.task.loss)
    return None if config.task.measurement == "loss" else measurement(config).cost


def adversarial_path(run: RunPaths, split: str) -> Path:
    """``adversarial/split=<s>/part-0.parquet``: sample_id, features (list<float32>)."""
    return run.dir / "adversarial" / f"split={split}" / "part-0.parquet"


def target_inputs(run: RunPaths, config: Config, work: Workload, split: str) -> Inputs:
    """The feature rows the target is evaluated on: the split's rows, or (robustness) their
    frozen adversarial versions, in ``work.rows(split)`` order."""
    rows = work.rows(split)
    if config.targets.utility != "robustness":
        return take(work.x, rows)
    return adversarial_rows(run, work, split)


def adversarial_rows(run: RunPaths, work: Workload, split: str) -> torch.Tensor:
    """Saved adversarial inputs of ``split``: (m, f) float32 in ``work.rows(split)`` order."""
    path = adversarial_path(run, split)
    if not path.exists():
        raise BadInput(f"run {run.run_id} has no adversarial examples for split {split}")
    table = read_parquet_table(path)
    ids = table["sample_id"].to_numpy()
    x = np.asarray(table["features"].to_pylist(), dtype=np.float32)
    expected = work.samples.sample_id[work.rows(split)]
    if not np.array_equal(ids, expected):
        raise BadInput(f"adversarial examples of split {split} don't match the run's samples")
    return torch.from_numpy(x)


def make_adversarial(config: Config, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     seed: int) -> torch.Tensor:
    """``targets.attack`` applied to rows (m, f) at ``model``: (m, f), detached."""
    a = config.targets.attack
    clip = tuple(a.clip) if a.clip else None
    if a.method == "fgsm":
        return fgsm(model, x, y, a.eps, clip)
    return pgd(model, x, y, a.eps, a.steps, a.step_size, clip, seed)


@task(name="attack", cache_policy=NO_CACHE)
def attack_stage(
    run: RunPaths, config: Config, tracking: Tracking, records: list[CheckpointRecord]
) -> None:
    """Robustness only: adversarial versions of the target split and of the test split, made at
    the final trained model and saved (kept as they are on resume)."""
    if config.targets.utility != "robustness":
        return
    log = get_run_logger()
    work = load_workload(run, config)
    final = [r for r in records if r.model == 0][-1]
    model = work.factory()
    model.load_state_dict(load_state_dict(final.path, final.sha256))
    model.eval()
    a = config.targets.attack
    with stage(run, tracking, "attack") as rec:
        rec.params({"method": a.method, "eps": a.eps, "steps": a.steps,
                    "step_size": a.step_size or a.eps / 4, "clip": str(a.clip)})
        for i, split in enumerate(dict.fromkeys([config.targets.split, "test"])):
            rows = work.rows(split)
            x, y = work.x[rows], work.y[rows]
            path = adversarial_path(run, split)
            if not path.exists():
                adv = make_adversarial(config, model, x, y, seed=config.seed + i)
                flat = pa.array(adv.numpy().reshape(-1), type=pa.float32())
                features = pa.FixedSizeListArray.from_arrays(flat, adv.shape[1]).cast(
                    pa.list_(pa.float32()))
                write_parquet_atomic(pa.table({
                    "sample_id": pa.array(work.samples.sample_id[rows], pa.int64()),
                    "features": features}), path)
            adv = adversarial_rows(run, work, split)
            clean_acc, adv_acc = accuracy(model, x, y), accuracy(model, adv, y)
            rec.metric("clean_accuracy", clean_acc, estimator=split)
            rec.metric("adversarial_accuracy", adv_acc, estimator=split)
            log.info("attack: %s L-inf eps=%g on %d %s rows: accuracy %.3f -> %.3f", a.method,
                     a.eps, len(rows), split, clean_acc, adv_acc)


def utility_row_count(config: Config, work: Workload) -> int:
    """Rows stored under ``utility_split``: 1 for a fairness gap, else one per target row."""
    if config.targets.utility in FAIRNESS_TARGETS:
        return 1
    return len(work.rows(config.targets.split))


def utility_gradient_rows(
    run: RunPaths, config: Config, work: Workload, model: nn.Module, start: int, stop: int,
    device: torch.device,
) -> tuple[np.ndarray, torch.Tensor]:
    """Rows [start, stop) of the stored grad U: (ids (m,), gradients (m, d)). Robustness: the
    per-row loss gradients at the frozen adversarial inputs (they sum to grad U_rob); fairness:
    the single row grad U with id ``FAIRNESS_ID``."""
    rows = work.rows(config.targets.split)
    y = work.y[rows].to(device)
    x = to_device(target_inputs(run, config, work, config.targets.split), device)
    if config.targets.utility == "robustness":
        ids = work.samples.sample_id[rows][start:stop]
        return ids.astype(np.int64), per_sample_gradients(model, take(x, slice(start, stop)),
                                                          y[start:stop])
    target = make_target(config, work, rows)
    grad = target.gradient(model, x, y).to(next(model.parameters()).dtype)
    return np.array([FAIRNESS_ID], dtype=np.int64), grad.unsqueeze(0)


@torch.no_grad()
def model_metrics(run: RunPaths, config: Config, work: Workload, model: nn.Module
                  ) -> dict[str, float]:
    """What a retrained model is judged by, on the test split (clean labels): test_accuracy,
    test_loss (mean nats); with binary groups dp_gap, eop_gap, eo_gap (hard predictions);
    with robustness robust_accuracy (on the frozen adversarial test rows); and target_cost,
    the configured utility U on the target rows (the quantity the scores predict)."""
    model.eval()
    test = work.rows("test")
    x, y = take(work.x, test), work.test_labels()[test]
    logits = call_model(model, x)
    out = {"test_accuracy": float((logits.argmax(1) == y).float().mean()),
           "test_loss": float(F.cross_entropy(logits, y))}
    if has_binary_groups(work.samples):
        pred = logits.argmax(1).numpy()
        out |= fairness_gaps(pred, y.numpy(), work.samples.group[test])
    if config.targets.utility == "robustness":
        out["robust_accuracy"] = accuracy(model, adversarial_rows(run, work, "test"), y)
    rows = work.rows(config.targets.split)
    target = make_target(config, work, rows)
    tx = target_inputs(run, config, work, config.targets.split)
    out["target_cost"] = float(target.cost(call_model(model, tx), work.y[rows]))
    return out
