"""Counterfactual evaluation (spec §9): plan the retrains, run them (cached), and judge every
estimator against them — LOO correlation, LDS, detection, and a prune curve against random
removal. Results go to ``evaluation.parquet`` (estimator, metric, value) and MLflow."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from estimators.counterfactual import lds, loo_correlation, mean_ci
from estimators.metrics import found_fraction, sample_sd
from presentation.plots import lds_bars, prune_curves
from storage.atomic import read_parquet_table, write_parquet_atomic
from storage.checkpoints import load_state_dict, read_checkpoint_index
from storage.store import RunPaths
from storage.tracking import Tracking
from storage.views import open_run
from tasks.config import Config
from tasks.groundtruth import Outcome, read_outcome, retrain_outcome
from tasks.progress import StageProgress
from tasks.prune import MOST_HARMFUL
from tasks.score import target_name
from tasks.stage import stage
from tasks.workload import load_workload
from workloads.inputs import call_model, take


@dataclass(frozen=True)
class Retrain:
    """One retrain of the plan. role: full | loo | lds | lds_fresh | pruned | random | brittle;
    ``label`` says which sample (loo), subset (lds, lds_fresh) or estimator@fraction
    (pruned/random) it belongs to."""

    role: str
    label: str
    removed: tuple[int, ...]
    seed: int


def _seeds(config: Config, count: int) -> list[int]:
    return [config.seed + s for s in range(count)]


_FRESH_STREAM = 23
"""Salt of the fresh-seed LDS retrains' seeds (``SeedSequence([seed, salt, subset, k])``)."""


def fresh_seeds(config: Config, subset: int) -> list[int]:
    """The ``evaluate.lds.fresh_seeds`` training seeds of LDS subset ``subset``: drawn per
    subset, so every retrain has its own initialization and data order, none shared with the
    attributed model (seed ``config.seed``) or with another subset (up to a 2^-31 collision)."""
    count = config.evaluate.lds.fresh_seeds
    return [int(np.random.SeedSequence([config.seed, _FRESH_STREAM, subset, k])
                .generate_state(1)[0] >> 1) for k in range(count)]


def plan_retrains(run: RunPaths, config: Config) -> list[Retrain]:
    """Every retrain the evaluation needs, from the config and the scores already written."""
    ev = config.evaluate
    work = load_workload(run, config)
    train_ids = np.sort(work.samples.sample_id[work.rows("train")])
    n = len(train_ids)
    plan = [Retrain("full", "full", (), s)
            for s in _seeds(config, max(ev.loo.seeds, ev.prune_curve.seeds, ev.lds.seeds))]
    loo_ids = np.random.default_rng([config.seed, 11]).choice(
        train_ids, min(ev.loo.samples, n), replace=False)
    plan += [Retrain("loo", str(i), (int(i),), s)
             for i in sorted(loo_ids.tolist()) for s in _seeds(config, ev.loo.seeds)]
    kept = int(round(ev.lds.fraction * n))
    for j in range(ev.lds.subsets):
        keep = np.random.default_rng([config.seed, 13, j]).choice(train_ids, kept, replace=False)
        removed = tuple(sorted(set(train_ids.tolist()) - set(keep.tolist())))
        plan += [Retrain("lds", str(j), removed, s) for s in _seeds(config, ev.lds.seeds)]
        plan += [Retrain("lds_fresh", str(j), removed, s) for s in fresh_seeds(config, j)]
    with open_run(run) as con:
        for q_index, q in enumerate(ev.prune_curve.fractions):
            count = max(1, int(round(q * n)))
            for s in _seeds(config, ev.prune_curve.seeds):
                chosen = np.random.default_rng([config.seed, 17, s, q_index]).choice(
                    train_ids, count, replace=False)
                plan.append(Retrain("random", f"random@{q}", tuple(sorted(chosen.tolist())), s))
            for spec in config.estimators:
                params = {"estimator": spec.name, "target": target_name(config), "count": count}
                ids = tuple(sorted(r[0] for r in con.execute(MOST_HARMFUL, params).fetchall()))
                plan += [Retrain("pruned", f"{spec.name}@{q}", ids, s)
                         for s in _seeds(config, ev.prune_curve.seeds)]
    if ev.brittleness.enabled:
        plan += _brittleness_plan(run, config, train_ids)
    return plan


def brittleness_targets(run: RunPaths, config: Config) -> np.ndarray:
    """Up to ``brittleness.targets`` attributed test samples the trained model gets right."""
    work = load_workload(run, config)
    ids = _lds_targets(run, config)
    rows = np.searchsorted(work.samples.sample_id, ids, sorter=np.argsort(work.samples.sample_id))
    order = np.argsort(work.samples.sample_id)[rows]
    records = read_checkpoint_index(run.checkpoints_dir)
    final = [r for r in records if r.model == 0][-1]
    model = work.factory()
    model.load_state_dict(load_state_dict(final.path, final.sha256))
    with torch.no_grad():
        logits = call_model(model.eval(), take(work.x, order))
        right = logits.argmax(1) == work.test_labels()[order]
    return ids[right.numpy()][: config.evaluate.brittleness.targets]


def _brittleness_plan(run: RunPaths, config: Config, train_ids: np.ndarray) -> list[Retrain]:
    b = config.evaluate.brittleness
    targets = brittleness_targets(run, config)
    plan = []
    for spec in config.estimators:
        matrix = _attribution_matrix(run, spec.name, train_ids, _lds_targets(run, config))
        if matrix is None:
            continue
        columns = np.searchsorted(_lds_targets(run, config), targets)
        for t, column in zip(targets, columns, strict=True):
            order = train_ids[np.argsort(-matrix[:, column], kind="stable")]
            plan += [Retrain("brittle", f"{spec.name}|{t}|{k}",
                             tuple(sorted(order[:k].tolist())), s)
                     for k in b.ks for s in _seeds(config, b.seeds)]
    for t in targets:
        for k in b.ks:
            chosen = np.random.default_rng([config.seed, 19, int(t), k]).choice(
                train_ids, k, replace=False)
            plan += [Retrain("brittle", f"random|{t}|{k}", tuple(sorted(chosen.tolist())), s)
                     for s in _seeds(config, b.seeds)]
    return plan


def _brittleness(plan_rows: list[Retrain], outcomes: dict) -> dict[tuple[str, int], float]:
    """{(estimator or 'random', k): fraction of targets whose mean margin after removing their
    top-k supporters is negative}."""
    margins: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for r in plan_rows:
        name, target, k = r.label.split("|")
        value = outcomes[(r.removed, r.seed)].margins(np.array([int(target)]))[0]
        margins[(name, int(target), int(k))].append(value)
    flipped: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for (name, _, k), values in margins.items():
        flipped[(name, k)].append(float(np.mean(values)) < 0)
    return {key: float(np.mean(v)) for key, v in flipped.items()}


@task(name="groundtruth", cache_policy=NO_CACHE)
def groundtruth_stage(
    run: RunPaths, config: Config, tracking: Tracking, store_root: str, plan: list[Retrain]
) -> dict[tuple[tuple[int, ...], int], Outcome]:
    """Run (or reuse from the store) every distinct retrain of ``plan`` on the task runner."""
    log = get_run_logger()
    unique = list(dict.fromkeys((r.removed, r.seed) for r in plan))
    with stage(run, tracking, "groundtruth") as rec:
        rec.params({"retrains": len(unique), "loo": config.evaluate.loo.model_dump_json(),
                    "lds": config.evaluate.lds.model_dump_json(),
                    "prune_curve": config.evaluate.prune_curve.model_dump_json()})
        futures = [retrain_outcome.submit(run, config, store_root, removed, seed)
                   for removed, seed in unique]
        retrains = StageProgress("groundtruth", len(unique), "retrains", log)
        outcomes, computed = {}, 0
        for i, (key, future) in enumerate(zip(unique, futures, strict=True), 1):
            path, fresh = future.result()
            outcomes[key] = read_outcome(path)
            computed += fresh
            retrains.advance(note=f"{computed} trained, {i - computed} reused")
        rec.metric("retrains_trained", computed)
        rec.metric("retrains_reused", len(unique) - computed)
    return outcomes


def _scores(run: RunPaths, config: Config, name: str) -> tuple[np.ndarray, np.ndarray]:
    table = read_parquet_table(run.scores_dir(name, target_name(config)) / "part-0.parquet")
    table = table.sort_by("sample_id")
    return table["sample_id"].to_numpy(), table["score"].to_numpy()


def _attribution_matrix(run: RunPaths, name: str, train_ids: np.ndarray,
                        target_ids: np.ndarray) -> np.ndarray | None:
    directory = run.attributions_dir(name)
    if not directory.exists():
        return None
    table = pa.concat_tables([read_parquet_table(p) for p in sorted(directory.glob("part-*"))])
    rows = np.searchsorted(train_ids, table["train_id"].to_numpy())
    cols = np.searchsorted(target_ids, table["test_id"].to_numpy())
    matrix = np.zeros((len(train_ids), len(target_ids)))
    matrix[rows, cols] = table["score"].to_numpy()
    return matrix


def lds_truth(
    lds_runs: list[Retrain], outcomes: dict, train_ids: np.ndarray, target_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """LDS ground truth: which training samples each subset kept, (M, n) bool over the sorted
    ``train_ids``, and each target's margin after retraining on it, (M, T), mean over seeds."""
    subsets = sorted({int(r.label) for r in lds_runs})
    membership = np.zeros((len(subsets), len(train_ids)), dtype=bool)
    margins = np.zeros((len(subsets), len(target_ids)))
    for j in subsets:
        runs = [r for r in lds_runs if int(r.label) == j]
        membership[j] = ~np.isin(train_ids, runs[0].removed)
        margins[j] = np.mean([outcomes[(r.removed, r.seed)].margins(target_ids) for r in runs],
                             axis=0)
    return membership, margins


@task(name="evaluation", cache_policy=NO_CACHE)
def evaluation_stage(
    run: RunPaths, config: Config, tracking: Tracking, plan: list[Retrain],
    outcomes: dict, scored: dict[str, dict[str, float]],
) -> dict[str, dict[str, float]]:
    """Judge every estimator; returns {estimator: {metric: value}} (also written to
    evaluation.parquet and MLflow)."""
    work = load_workload(run, config)
    train_ids = np.sort(work.samples.sample_id[work.rows("train")])
    by_role: dict[str, list[Retrain]] = defaultdict(list)
    for r in plan:
        by_role[r.role].append(r)
    full = {r.seed: outcomes[(r.removed, r.seed)] for r in by_role["full"]}

    loo = defaultdict(list)
    for r in by_role["loo"]:
        o = outcomes[(r.removed, r.seed)]
        split = config.targets.split
        loo[int(r.label)].append(o.summed_loss(split) - full[r.seed].summed_loss(split))
    loo_ids = np.array(sorted(loo))
    loo_delta = np.array([np.mean(loo[i]) for i in loo_ids])

    target_ids = _lds_targets(run, config)
    membership, margins = lds_truth(by_role["lds"], outcomes, train_ids, target_ids)
    fresh = (lds_truth(by_role["lds_fresh"], outcomes, train_ids, target_ids)
             if by_role["lds_fresh"] else None)

    accuracy = defaultdict(list)
    for r in by_role["pruned"] + by_role["random"] + by_role["full"]:
        accuracy[r.label].append(outcomes[(r.removed, r.seed)].accuracy("test"))

    corrupted = work.samples.corrupted
    lookup = (dict(zip(work.samples.sample_id.tolist(), corrupted.tolist(), strict=True))
              if corrupted is not None and corrupted.any() else None)
    table: dict[str, dict[str, float]] = {}
    for spec in config.estimators:
        name = spec.name
        ids, score = _scores(run, config, name)
        row = dict(scored.get(name, {}))
        at = np.searchsorted(ids, loo_ids)
        row["loo_pearson"], row["loo_spearman"] = loo_correlation(score[at], loo_delta)
        matrix = _attribution_matrix(run, name, train_ids, target_ids)
        if matrix is not None and len(membership) >= 3:
            row["lds"], row["lds_low"], row["lds_high"] = mean_ci(
                lds(matrix, membership, margins))
            if fresh is not None:
                row["lds_fresh"], row["lds_fresh_low"], row["lds_fresh_high"] = mean_ci(
                    lds(matrix, *fresh))
        if lookup is not None:
            truth = np.array([lookup[int(i)] for i in ids])
            for top in (0.05, 0.10, 0.20):
                row[f"found_top{int(top * 100)}"] = found_fraction(-score, truth, top)
        for q in config.evaluate.prune_curve.fractions:
            pruned, rand = accuracy[f"{name}@{q}"], accuracy[f"random@{q}"]
            row[f"prune_accuracy@{q}"] = float(np.mean(pruned))
            row[f"prune_gain@{q}"] = float(np.mean(pruned) - np.mean(rand))
        table[name] = row
    for (name, k), fraction in _brittleness(by_role["brittle"], outcomes).items():
        key = "random_removal" if name == "random" else name
        table.setdefault(key, {})[f"brittleness_flipped@{k}"] = fraction
    for q in config.evaluate.prune_curve.fractions:
        values = accuracy[f"random@{q}"]
        table.setdefault("random_removal", {})[f"prune_accuracy@{q}"] = float(np.mean(values))
        if len(values) > 1:  # the sample sd of one seed is undefined
            table["random_removal"][f"prune_accuracy_sd@{q}"] = sample_sd(values)
    table.setdefault("full_data", {})["test_accuracy"] = float(np.mean(accuracy["full"]))
    _record(run, tracking, table, accuracy, config)
    return table


def _lds_targets(run: RunPaths, config: Config) -> np.ndarray:
    from tasks.score import pairwise_targets

    work = load_workload(run, config)
    return pairwise_targets(config, work.samples.sample_id[work.rows("test")])


def _record(run: RunPaths, tracking: Tracking, table: dict, accuracy: dict,
            config: Config) -> None:
    rows = [(est, metric, float(value)) for est, metrics in table.items()
            for metric, value in metrics.items()]
    write_parquet_atomic(
        pa.table({"estimator": [r[0] for r in rows], "metric": [r[1] for r in rows],
                  "value": [r[2] for r in rows]}),
        run.evaluation,
    )
    with stage(run, tracking, "evaluate") as rec:
        for est, metric, value in rows:
            if np.isfinite(value):
                rec.metric(metric.replace("@", "_at_"), value, estimator=est)
        ests = [e.name for e in config.estimators]
        rec.artifact(lds_bars({e: table[e] for e in ests if "lds" in table[e]},
                              run.dir / "plots" / "lds.png"))
        rec.artifact(prune_curves(accuracy, ests, config.evaluate.prune_curve.fractions,
                                  run.dir / "plots" / "prune_curves.png"))
