"""The ground truth of a finished Sieve evaluation run, rebuilt from the store, and Sieve's own
metric functions applied to any (score, matrix) pair: what ``tasks.evaluation`` computes for
Sieve's estimators, so a peer is judged against exactly the same retrains.

The plan is ``tasks.evaluation.plan_retrains(run, config)`` with the run's resolved config; each
outcome is read from ``outcome_path(store, retrain_key(config, data_fingerprint(work), removed,
seed))``. A peer's own pruned set (its ``count`` lowest scores, ties by sample id, as
``tasks.prune.MOST_HARMFUL`` orders them) is retrained with ``retrain_outcome.fn`` (cached in
the store like every other retrain).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from estimators.counterfactual import lds, loo_correlation, mean_ci
from estimators.metrics import detection_auc
from storage.atomic import read_parquet_table
from storage.store import RunPaths, Store
from tasks.config import Config, load_resolved_config


@dataclass
class GroundTruth:
    run: RunPaths
    config: Config
    store_root: str
    train_ids: np.ndarray  # (n,) sorted
    corrupted: np.ndarray | None  # (n,) bool aligned with train_ids, None when unknown
    loo_ids: np.ndarray  # (k,) sorted
    loo_delta: np.ndarray  # (k,) mean over seeds of U_val(without i) - U_val(full)
    target_ids: np.ndarray  # (T,) sorted LDS targets
    membership: np.ndarray  # (M, n) bool: kept in subset j
    margins: np.ndarray  # (M, T) mean margin over seeds after retrain j
    fresh: tuple[np.ndarray, np.ndarray] | None  # (membership, margins) over fresh seeds
    random_accuracy: dict[float, list[float]]  # q -> test accuracy of random removal, per seed
    full_accuracy: list[float]

    @property
    def fractions(self) -> list[float]:
        return list(self.config.evaluate.prune_curve.fractions)

    def seeds(self) -> list[int]:
        return [self.config.seed + s for s in range(self.config.evaluate.prune_curve.seeds)]


def load_ground_truth(store_root: str, run_id: str) -> GroundTruth:
    """The retrain outcomes a finished ``sieve evaluate`` run was judged against."""
    from tasks.evaluation import lds_truth, plan_retrains
    from tasks.groundtruth import data_fingerprint, outcome_path, read_outcome, retrain_key
    from tasks.score import pairwise_targets
    from tasks.workload import load_workload

    run = Store(store_root).existing_run(run_id)
    config = load_resolved_config(run.config)
    work = load_workload(run, config)
    fingerprint = data_fingerprint(work)
    plan = [r for r in plan_retrains(run, config) if r.role != "pruned"]
    outcomes = {}
    for r in plan:
        key = (r.removed, r.seed)
        if key not in outcomes:
            path = outcome_path(store_root, retrain_key(config, fingerprint, r.removed, r.seed))
            if not path.exists():
                raise FileNotFoundError(f"retrain outcome {path.name} of run {run_id} is missing")
            outcomes[key] = read_outcome(path)
    by_role = defaultdict(list)
    for r in plan:
        by_role[r.role].append(r)

    train_ids = np.sort(work.samples.sample_id[work.rows("train")])
    full = {r.seed: outcomes[(r.removed, r.seed)] for r in by_role["full"]}
    loo = defaultdict(list)
    for r in by_role["loo"]:
        o = outcomes[(r.removed, r.seed)]
        loo[int(r.label)].append(o.summed_loss("val") - full[r.seed].summed_loss("val"))
    loo_ids = np.array(sorted(loo), dtype=np.int64)

    target_ids = pairwise_targets(config, work.samples.sample_id[work.rows("test")])
    membership, margins = lds_truth(by_role["lds"], outcomes, train_ids, target_ids)
    fresh = (lds_truth(by_role["lds_fresh"], outcomes, train_ids, target_ids)
             if by_role["lds_fresh"] else None)

    random_accuracy: dict[float, list[float]] = defaultdict(list)
    for r in by_role["random"]:
        random_accuracy[float(r.label.split("@", 1)[1])].append(
            outcomes[(r.removed, r.seed)].accuracy("test"))
    corrupted = None
    if work.samples.corrupted is not None and work.samples.corrupted.any():
        lookup = dict(zip(work.samples.sample_id.tolist(), work.samples.corrupted.tolist(),
                          strict=True))
        corrupted = np.array([lookup[int(i)] for i in train_ids], dtype=bool)
    return GroundTruth(
        run=run, config=config, store_root=str(store_root), train_ids=train_ids,
        corrupted=corrupted, loo_ids=loo_ids,
        loo_delta=np.array([np.mean(loo[int(i)]) for i in loo_ids]),
        target_ids=np.asarray(target_ids, dtype=np.int64), membership=membership,
        margins=margins, fresh=fresh, random_accuracy=dict(random_accuracy),
        full_accuracy=[o.accuracy("test") for o in full.values()],
    )


def align(ids: np.ndarray, values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``values`` (aligned with ``ids``, first axis) reordered to ``order``."""
    ids = np.asarray(ids)
    sort = np.argsort(ids, kind="stable")
    at = sort[np.searchsorted(ids, order, sorter=sort)]
    if not np.array_equal(ids[at], order):
        raise ValueError("scores do not cover the ids the ground truth needs")
    return np.asarray(values)[at]


def per_target_lds(truth: GroundTruth, train_ids: np.ndarray, matrix: np.ndarray,
                   target_ids: np.ndarray) -> dict[str, np.ndarray]:
    """LDS of every target (T,) of the truth, for attributions ``matrix`` (n, T') over
    (train_ids, target_ids): {"lds": fixed-seed, "lds_fresh": fresh-seed (when the run has
    it)}."""
    m = align(train_ids, matrix, truth.train_ids)
    m = align(target_ids, m.T, truth.target_ids).T
    out = {"lds": lds(m, truth.membership, truth.margins)}
    if truth.fresh is not None:
        out["lds_fresh"] = lds(m, *truth.fresh)
    return out


def paired_difference(mine: np.ndarray, theirs: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high) of ``mine - theirs`` over the targets where both are finite: the 95%
    CI of a paired difference, narrower than comparing two CIs when targets vary a lot."""
    both = np.isfinite(mine) & np.isfinite(theirs)
    return mean_ci(np.asarray(mine)[both] - np.asarray(theirs)[both])


def metrics(truth: GroundTruth, train_ids: np.ndarray, score: np.ndarray,
            matrix: np.ndarray | None = None, target_ids: np.ndarray | None = None
            ) -> dict[str, float]:
    """Sieve's metrics for ``score`` (n,) and, when given, ``matrix`` (n, T) over
    ``target_ids``: LOO Pearson/Spearman, LDS mean and 95% CI (and the fresh-seed LDS when the
    run has it), detection AUC of -score."""
    score = align(train_ids, score, truth.train_ids)
    row: dict[str, float] = {}
    at = np.searchsorted(truth.train_ids, truth.loo_ids)
    row["loo_pearson"], row["loo_spearman"] = loo_correlation(score[at], truth.loo_delta)
    if matrix is not None and len(truth.membership) >= 3:
        for key, values in per_target_lds(truth, train_ids, matrix, target_ids).items():
            row[key], row[f"{key}_low"], row[f"{key}_high"] = mean_ci(values)
    if truth.corrupted is not None:
        row["detection_auc"] = detection_auc(-score, truth.corrupted)
    return row


def most_harmful(truth: GroundTruth, train_ids: np.ndarray, score: np.ndarray,
                 q: float) -> tuple[int, ...]:
    """The ``max(1, round(q n))`` lowest-scoring sample ids (ties: lower id first)."""
    score = align(train_ids, score, truth.train_ids)
    count = max(1, int(round(q * len(truth.train_ids))))
    order = np.lexsort((truth.train_ids, score))
    return tuple(sorted(int(i) for i in truth.train_ids[order[:count]]))


def prune_gain(truth: GroundTruth, train_ids: np.ndarray, score: np.ndarray,
               q: float) -> tuple[float, float, int]:
    """(test accuracy after removing the most harmful q, its gain over random removal of q,
    retrains trained now) over the run's prune-curve seeds, retrained like Sieve's arms."""
    from tasks.groundtruth import read_outcome, retrain_outcome

    removed = most_harmful(truth, train_ids, score, q)
    accuracy, trained = [], 0
    for seed in truth.seeds():
        path, fresh = retrain_outcome.fn(truth.run, truth.config, truth.store_root, removed,
                                         seed)
        trained += fresh
        accuracy.append(read_outcome(Path(path)).accuracy("test"))
    pruned = float(np.mean(accuracy))
    return pruned, pruned - float(np.mean(truth.random_accuracy[q])), trained


def stored_scores(run: RunPaths, config: Config, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, scores) Sieve wrote for estimator ``name`` against the summed target."""
    from tasks.score import target_name

    table = read_parquet_table(run.scores_dir(name, target_name(config)) / "part-0.parquet")
    return table["sample_id"].to_numpy(), table["score"].to_numpy()


def stored_attributions(run: RunPaths, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train ids, target ids, (n, T) matrix) Sieve wrote for ``name`` (KeyError if none)."""
    directory = run.attributions_dir(name)
    parts = sorted(directory.glob("part-*"))
    if not parts:
        raise KeyError(f"no attributions for {name}")
    table = pa.concat_tables([read_parquet_table(p) for p in parts])
    train = np.unique(table["train_id"].to_numpy())
    test = np.unique(table["test_id"].to_numpy())
    matrix = np.zeros((len(train), len(test)))
    matrix[np.searchsorted(train, table["train_id"].to_numpy()),
           np.searchsorted(test, table["test_id"].to_numpy())] = table["score"].to_numpy()
    return train, test, matrix
