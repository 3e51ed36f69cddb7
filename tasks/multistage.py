"""The multistage flow's tasks: two-task samples, pretrain + finetune, score the pretraining
samples, prune them, re-pretrain + re-finetune, and validate against leave-one-out refits.

Task A (pretraining) is ``multistage.pretrain_classes``, its train split the pretraining set;
task B (finetuning) is ``multistage.finetune_classes``: its train split finetunes, its
``targets.split`` is the target the scores are about, its test split measures the outcome.
samples.parquet holds both tasks, labels relabeled 0..C-1 within each, and a ``task`` column.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from scipy.stats import pearsonr, spearmanr

from estimators.metrics import detection_auc, sample_sd
from estimators.multistage import Finetuning, multistage_influence, pretrain_loss_baseline
from storage.atomic import read_parquet_table, write_parquet_atomic
from storage.checkpoints import (
    CheckpointRecord,
    load_state_dict,
    read_checkpoint_index,
    save_checkpoint,
    write_checkpoint_index,
)
from storage.errors import BadInput
from storage.store import RunPaths
from storage.tracking import Tracking
from storage.views import open_run
from tasks.config import Config
from tasks.prune import (
    MOST_HARMFUL,
    Removal,
    control_removals,
    prune_count,
    retrain_seeds,
    select_samples,
)
from tasks.score import SCORE_SCHEMA, target_name
from tasks.stage import stage
from tasks.train import load_samples
from workloads.datasets import Samples, read_samples, samples_table
from workloads.two_stage import (
    TaskData,
    TwoStageModel,
    TwoStageRecipe,
    finetune,
    finetune_metrics,
    fit,
    noisy_pretraining,
    pretrain,
    pretrain_accuracy,
    refit_warm,
    split_tasks,
    task_rows,
    two_stage_mlp,
)

ESTIMATOR = "multistage"
BASELINE = "pretrain_loss"
SCORED = (ESTIMATOR, BASELINE)


def two_stage_samples(config: Config) -> tuple[Samples, np.ndarray]:
    """Both tasks' samples (label noise, if any, on the pretraining train split only) and
    each sample's task. BadInput when a class or a needed split is empty."""
    ms = config.multistage
    clean = config.model_copy(update={"data": config.data.model_copy(update={"noise": 0.0})})
    samples, tasks = split_tasks(load_samples(clean), ms.pretrain_classes, ms.finetune_classes)
    for name, split in (("pretrain", "train"), ("finetune", "train"),
                        ("finetune", config.targets.split), ("finetune", "test")):
        if not ((tasks == name) & (samples.split == split)).any():
            raise BadInput(f"multistage: the {name} task has no {split} samples")
    if config.data.noise > 0:
        samples = noisy_pretraining(samples, tasks, config.data.noise, config.seed)
    return samples, tasks


def preflight_multistage(config: Config) -> None:
    """Fail fast on data problems, before any flow starts (raises BadInput)."""
    two_stage_samples(config)


def recipe(config: Config) -> TwoStageRecipe:
    ms = config.multistage
    return TwoStageRecipe(ms.finetune, ms.proximal, ms.pretrain_weight_decay,
                          ms.finetune_weight_decay, ms.max_iter, ms.tolerance)


@dataclass(frozen=True)
class TwoStageWork:
    """A run's two tasks: pretraining rows, finetuning rows, target rows, test rows."""

    pretraining: TaskData
    finetuning: TaskData
    target: TaskData
    test: TaskData
    corrupted: np.ndarray  # (m,) bool, aligned with pretraining
    input_dim: int


@lru_cache(maxsize=4)
def _read(path: Path, mtime_ns: int) -> tuple[Samples, np.ndarray]:
    tasks = read_parquet_table(path, columns=["task"])["task"].to_numpy(zero_copy_only=False)
    return read_samples(path), np.asarray(tasks, dtype=str)


def load_two_stage(run: RunPaths, config: Config) -> TwoStageWork:
    samples, tasks = _read(run.samples, run.samples.stat().st_mtime_ns)
    pretraining = task_rows(samples, tasks, "pretrain", "train")
    corrupted = samples.corrupted if samples.corrupted is not None \
        else np.zeros(len(samples.label), dtype=bool)
    return TwoStageWork(
        pretraining=pretraining,
        finetuning=task_rows(samples, tasks, "finetune", "train"),
        target=task_rows(samples, tasks, "finetune", config.targets.split),
        test=task_rows(samples, tasks, "finetune", "test"),
        corrupted=corrupted[np.isin(samples.sample_id, pretraining.ids)],
        input_dim=samples.x.shape[1],
    )


def new_model(config: Config, work: TwoStageWork, seed: int) -> TwoStageModel:
    ms = config.multistage
    return two_stage_mlp(work.input_dim, ms.hidden, len(ms.pretrain_classes),
                         len(ms.finetune_classes), seed)


def summed_loss(model: TwoStageModel, data: TaskData) -> float:
    return finetune_metrics(model, data)[0] * len(data.y)


@task(name="prepare-samples", cache_policy=NO_CACHE)
def prepare_two_stage_samples(run: RunPaths, config: Config) -> int:
    """Write samples.parquet (both tasks, with a ``task`` column) once."""
    if not run.samples.exists():
        samples, tasks = two_stage_samples(config)
        table = samples_table(samples).append_column("task", pa.array(tasks, pa.string()))
        write_parquet_atomic(table, run.samples)
    return int(run.samples.stat().st_size)


@task(name="train", cache_policy=NO_CACHE)
def train_two_stages(run: RunPaths, config: Config, tracking: Tracking) -> list[CheckpointRecord]:
    """Pretrain on task A, then finetune on task B; checkpoint 0 is the pretrained model,
    checkpoint 1 the finetuned one (reused when the run already has them)."""
    log = get_run_logger()
    if run.checkpoint_index.exists():
        log.info("train: reusing the checkpoints in %s", run.checkpoints_dir)
        return read_checkpoint_index(run.checkpoints_dir)
    work = load_two_stage(run, config)
    how = recipe(config)
    model = new_model(config, work, config.seed)
    with stage(run, tracking, "pretrain") as rec:
        rec.params({"hidden": config.multistage.hidden, "n_pretrain": len(work.pretraining.y),
                    "weight_decay": how.pretrain_weight_decay, "seed": config.seed,
                    "optimizer": "lbfgs", "tolerance": how.tolerance})
        started = time.perf_counter()
        pretrain_iters = pretrain(model, work.pretraining, how)
        pretrained = model.copy()
        rec.metric("iterations", pretrain_iters)
        rec.metric("train_accuracy", pretrain_accuracy(pretrained, work.pretraining))
        log.info("pretrain: %d samples, %d L-BFGS iterations, %.1f s", len(work.pretraining.y),
                 pretrain_iters, time.perf_counter() - started)
    with stage(run, tracking, "finetune") as rec:
        rec.params({"mode": how.mode, "proximal": how.proximal, "n_finetune":
                    len(work.finetuning.y), "weight_decay": how.finetune_weight_decay})
        started = time.perf_counter()
        finetune_iters = finetune(model, work.finetuning, how)
        rec.metric("iterations", finetune_iters)
        for split, data in (("target", work.target), ("test", work.test)):
            loss, acc = finetune_metrics(model, data)
            rec.metric(f"{split}_loss", loss)
            rec.metric(f"{split}_accuracy", acc)
        log.info("finetune (%s): %d samples, %d L-BFGS iterations, test loss %.4f, %.1f s",
                 how.mode, len(work.finetuning.y), finetune_iters,
                 finetune_metrics(model, work.test)[0], time.perf_counter() - started)
        records = []
        for index, (name, snapshot, step) in enumerate(
            [("pretrain", pretrained, pretrain_iters),
             ("finetune", model, pretrain_iters + finetune_iters)]
        ):
            path, sha = save_checkpoint(run.checkpoints_dir / f"stage={name}", step,
                                        snapshot.state())
            records.append(CheckpointRecord(index, step, float("nan"), 1.0, str(path), sha))
        write_checkpoint_index(run.checkpoints_dir, records)
    return read_checkpoint_index(run.checkpoints_dir)


def load_models(run: RunPaths, config: Config,
                records: list[CheckpointRecord]) -> tuple[TwoStageModel, TwoStageModel]:
    """(pretrained, finetuned) from checkpoints 0 and 1."""
    work = load_two_stage(run, config)
    pretrained, finetuned = (
        new_model(config, work, config.seed).load(load_state_dict(r.path, r.sha256))
        for r in records[:2]
    )
    return pretrained, finetuned


@task(name="scores", cache_policy=NO_CACHE)
def score_pretraining(run: RunPaths, config: Config, tracking: Tracking,
                      records: list[CheckpointRecord]) -> dict[str, dict[str, float]]:
    """Multistage influence and the pretraining-loss baseline for every pretraining sample,
    written under scores/estimator=<e>/target=<split>_loss; returns {estimator: metrics}."""
    log = get_run_logger()
    torch.set_num_threads(1)
    work = load_two_stage(run, config)
    pretrained, finetuned = load_models(run, config, records)
    ms = config.multistage
    with stage(run, tracking, "score") as rec:
        rec.params({"estimators": ",".join(SCORED), "target": target_name(config),
                    "solver": ms.solver, "damping": ms.damping})
        started = time.perf_counter()
        result = multistage_influence(
            pretrained.embed, pretrained.pretrain_head, finetuned.embed,
            finetuned.finetune_head,
            (work.pretraining.x, work.pretraining.y), (work.finetuning.x, work.finetuning.y),
            (work.target.x, work.target.y),
            Finetuning(ms.finetune, ms.proximal, ms.finetune_weight_decay, ms.damping),
            ms.pretrain_weight_decay, ms.solver,
        )
        seconds = time.perf_counter() - started
        rec.metric("solver_residual", result.solver_residual, estimator=ESTIMATOR)
        log.info("score: multistage influence of %d pretraining samples in %.2f s "
                 "(relative residual %.1e)", len(result.score), seconds, result.solver_residual)
        summary: dict[str, dict[str, float]] = {}
        for name, score in ((ESTIMATOR, result.score), (BASELINE, pretrain_loss_baseline(result))):
            _write_scores(run, config, name, work.pretraining.ids, score)
            row = {"seconds": seconds} if name == ESTIMATOR else {}
            if work.corrupted.any():
                row["detection_auc"] = detection_auc(-score, work.corrupted)
            for key, value in row.items():
                rec.metric(key, value, estimator=name)
            summary[name] = row
    return summary


def _write_scores(run: RunPaths, config: Config, name: str, ids: np.ndarray,
                  score: np.ndarray) -> None:
    table = pa.table({"sample_id": ids.astype(np.int64), "score": score.astype(np.float64),
                      "suspicion": np.full(len(score), np.nan)}, schema=SCORE_SCHEMA)
    write_parquet_atomic(table, run.scores_dir(name, target_name(config)) / "part-0.parquet")


@task(name="prune", cache_policy=NO_CACHE)
def prune_pretraining(run: RunPaths, config: Config, tracking: Tracking) -> list[Removal]:
    """Per seed: full data, a random ``prune.fraction`` of the pretraining set, and that many
    most harmful samples by each scored estimator (a DuckDB query over the scores)."""
    work = load_two_stage(run, config)
    ids = work.pretraining.ids
    count = prune_count(config, len(ids))
    seeds = retrain_seeds(config)
    removals = control_removals(config, ids, count)
    with stage(run, tracking, "prune") as rec, open_run(run) as con:
        rec.params({"fraction": config.prune.fraction, "count": count, "by": ",".join(SCORED)})
        for name in SCORED:
            harmful = select_samples(con, run, MOST_HARMFUL, name, target_name(config), count)
            rec.metric("removed", len(harmful), estimator=name)
            removals += [Removal(f"pruned:{name}", s, tuple(harmful)) for s in seeds]
    return removals


@task(name="refit-one", cache_policy=NO_CACHE)
def refit_one(run: RunPaths, config: Config, removal: Removal) -> tuple[float, float]:
    """(finetune test loss, test accuracy) after pretraining from scratch (init ``seed``)
    without ``removal.removed``, then finetuning."""
    torch.set_num_threads(1)
    work = load_two_stage(run, config)
    model = new_model(config, work, removal.seed)
    fit(model, work.pretraining.without(np.array(removal.removed, dtype=np.int64)),
        work.finetuning, recipe(config))
    return finetune_metrics(model, work.test)


@task(name="retrain", cache_policy=NO_CACHE)
def retrain_two_stages(run: RunPaths, config: Config, tracking: Tracking,
                       removals: list[Removal]) -> dict[str, dict[str, list[float]]]:
    """Every removal re-pretrained and re-finetuned (in parallel on the task runner):
    {arm: {"test_loss": [per seed], "test_accuracy": [per seed]}}."""
    log = get_run_logger()
    arms: dict[str, dict[str, list[float]]] = {}
    with stage(run, tracking, "retrain") as rec:
        rec.params({"retrains": len(removals), "seeds": config.prune.seeds})
        started = time.perf_counter()
        futures = [refit_one.submit(run, config, r) for r in removals]
        for i, (removal, future) in enumerate(zip(removals, futures, strict=True), 1):
            loss, acc = future.result()
            arm = arms.setdefault(removal.arm, {"test_loss": [], "test_accuracy": []})
            arm["test_loss"].append(loss)
            arm["test_accuracy"].append(acc)
            rec.metric("test_loss", loss, estimator=removal.arm, seed=removal.seed)
            rec.metric("test_accuracy", acc, estimator=removal.arm, seed=removal.seed)
            log.info("retrain: %d/%d (%s, seed %d) finetune test loss %.4f, accuracy %.4f, "
                     "%.1f s elapsed", i, len(removals), removal.arm, removal.seed, loss, acc,
                     time.perf_counter() - started)
        for name, values in arms.items():
            for metric, per_seed in values.items():
                rec.metric(f"{metric}_mean", float(np.mean(per_seed)), estimator=name)
                if len(per_seed) > 1:  # the sample sd of one seed is undefined
                    rec.metric(f"{metric}_sd", sample_sd(per_seed), estimator=name)
    return arms


def validation_rows(config: Config, m: int) -> np.ndarray:
    """The pretraining rows removed one at a time: a seeded sample (sorted)."""
    k = min(config.multistage.validation.samples, m)
    return np.sort(np.random.default_rng([config.seed, 7]).choice(m, k, replace=False))


@task(name="loo-one", cache_policy=NO_CACHE)
def loo_one(run: RunPaths, config: Config, records: list[CheckpointRecord], row: int) -> float:
    """m * (summed target loss without pretraining row ``row`` - with it), both stages refit
    warm from their optima (m: the pretraining set's size)."""
    torch.set_num_threads(1)
    work = load_two_stage(run, config)
    pretrained, finetuned = load_models(run, config, records)
    refit = refit_warm(pretrained, finetuned, work.pretraining.without(work.pretraining.ids[[row]]),
                       work.finetuning, recipe(config))
    m = len(work.pretraining.y)
    return m * (summed_loss(refit, work.target) - summed_loss(finetuned, work.target))


@task(name="validate", cache_policy=NO_CACHE)
def validate_multistage(run: RunPaths, config: Config, tracking: Tracking,
                        records: list[CheckpointRecord]) -> dict[str, dict[str, float]]:
    """Leave-one-out over ``multistage.validation.samples`` pretraining samples: Pearson and
    Spearman of each estimator's score with the actual change; writes evaluation.parquet
    (estimator, metric, value) and validation.parquet (sample_id, actual, one column per
    estimator)."""
    log = get_run_logger()
    work = load_two_stage(run, config)
    rows = validation_rows(config, len(work.pretraining.y))
    scores = _read_scores(run, config, work.pretraining.ids[rows])
    table: dict[str, dict[str, float]] = {}
    with stage(run, tracking, "validate") as rec:
        rec.params({"samples": len(rows), "refit": "warm start, both stages"})
        started = time.perf_counter()
        futures = [loo_one.submit(run, config, records, int(r)) for r in rows]
        actual = []
        for i, future in enumerate(futures, 1):
            actual.append(future.result())
            if i % 10 == 0 or i == len(futures):
                log.info("validate: %d/%d leave-one-out refits, %.1f s", i, len(futures),
                         time.perf_counter() - started)
        actual_arr = np.array(actual)
        for name in SCORED:
            pearson = float(pearsonr(scores[name], actual_arr)[0])
            spearman = float(spearmanr(scores[name], actual_arr)[0])
            table[name] = {"loo_pearson": pearson, "loo_spearman": spearman,
                           "loo_samples": float(len(rows))}
            rec.metric("loo_pearson", pearson, estimator=name)
            rec.metric("loo_spearman", spearman, estimator=name)
        path = run.dir / "validation.parquet"
        write_parquet_atomic(pa.table({"sample_id": work.pretraining.ids[rows],
                                       "actual": actual_arr,
                                       **{name: scores[name] for name in SCORED}}), path)
        rec.artifact(path)
        flat = [(e, metric, v) for e, metrics in table.items() for metric, v in metrics.items()]
        write_parquet_atomic(pa.table({"estimator": [f[0] for f in flat],
                                       "metric": [f[1] for f in flat],
                                       "value": [f[2] for f in flat]}), run.evaluation)
    return table


def _read_scores(run: RunPaths, config: Config, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Each scored estimator's scores of ``ids``, in that order."""
    out = {}
    for name in SCORED:
        table = read_parquet_table(run.scores_dir(name, target_name(config)) / "part-0.parquet")
        lookup = dict(zip(table["sample_id"].to_pylist(), table["score"].to_pylist(),
                          strict=True))
        out[name] = np.array([lookup[int(i)] for i in ids])
    return out
