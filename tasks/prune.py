"""Stage 4: choose what to remove — the most harmful training samples by a DuckDB query over
the scores, and random subsets of the same size as the control."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage.atomic import write_parquet_atomic
from storage.store import RunPaths
from storage.tracking import Tracking
from storage.views import open_run
from tasks.config import Config
from tasks.score import target_name
from tasks.stage import stage
from tasks.workload import load_workload

MOST_HARMFUL = """
    select sample_id from scores
    where estimator = $estimator and target = $target
    order by score asc, sample_id asc
    limit $count
"""


@dataclass(frozen=True)
class Removal:
    """One retraining arm: train without ``removed`` (sample ids), for ``seed``."""

    arm: str
    seed: int
    removed: tuple[int, ...]


LEAST_USEFUL = """
    select sample_id from scores
    where estimator = $estimator and target = $target
    order by score asc, sample_id desc
    limit $count
"""
"""Keep mode: the complement of the coreset (the top scores, ties to the smaller id)."""


def prune_count(config: Config, n_train: int) -> int:
    return max(1, int(round(config.prune.fraction * n_train)))


def removal_count(config: Config, n_train: int) -> int:
    """Samples each arm removes: ``fraction`` of them, or (``mode: keep``) all but that."""
    count = prune_count(config, n_train)
    return count if config.prune.mode == "remove" else n_train - count


def retrain_seeds(config: Config) -> list[int]:
    return [config.seed + i for i in range(config.prune.seeds)]


def control_removals(config: Config, train_ids: np.ndarray, count: int) -> list[Removal]:
    """The control arms, per retrain seed: full data, and ``count`` random training samples
    removed (seeded by the run seed and the retrain seed)."""
    seeds = retrain_seeds(config)
    removals = [Removal("full", s, ()) for s in seeds]
    for s in seeds:
        chosen = np.random.default_rng([config.seed, 1000 + s]).choice(train_ids, count, False)
        removals.append(Removal("random", s, tuple(sorted(chosen.tolist()))))
    return removals


def select_samples(con, run: RunPaths, query: str, estimator: str, target: str,
                   count: int) -> list[int]:
    """The ``count`` sample ids ``query`` picks from ``estimator``'s scores for ``target``, in
    order; also written to ``prune/estimator=<e>/part-0.parquet`` (sample_id, rank)."""
    params = {"estimator": estimator, "target": target, "count": count}
    ids = [row[0] for row in con.execute(query, params).fetchall()]
    write_parquet_atomic(
        pa.table({"sample_id": pa.array(ids, pa.int64()),
                  "rank": pa.array(range(len(ids)), pa.int64())}),
        run.dir / "prune" / f"estimator={estimator}" / "part-0.parquet",
    )
    return ids


@task(name="prune", cache_policy=NO_CACHE)
def prune_stage(run: RunPaths, config: Config, tracking: Tracking) -> list[Removal]:
    """The removals to retrain: full data, random, and pruned-by-each-``prune.by``, per seed.
    ``prune.mode: keep`` removes everything but the top ``fraction`` by score (a coreset), and
    its random arm keeps a random subset of the same size."""
    log = get_run_logger()
    work = load_workload(run, config)
    train_ids = work.samples.sample_id[work.rows("train")]
    count = removal_count(config, len(train_ids))
    seeds = retrain_seeds(config)
    removals = control_removals(config, train_ids, count)
    known = work.samples.corrupted
    corrupted = {} if known is None else dict(
        zip(work.samples.sample_id.tolist(), known.tolist(), strict=True)
    )
    with stage(run, tracking, "prune") as rec, open_run(run) as con:
        rec.params({"fraction": config.prune.fraction, "count": count,
                    "by": ",".join(config.prune.by), "mode": config.prune.mode})
        query = MOST_HARMFUL if config.prune.mode == "remove" else LEAST_USEFUL
        for name in config.prune.by:
            ids = select_samples(con, run, query, name, target_name(config), count)
            rec.metric("removed", len(ids), estimator=name)
            if known is None:
                log.info("prune: %d most harmful by %s", len(ids), name)
            else:
                hit = float(np.mean([corrupted[i] for i in ids]))
                rec.metric("removed_corrupted_fraction", hit, estimator=name)
                log.info("prune: %d most harmful by %s, %.0f%% of them corrupted", len(ids),
                         name, 100 * hit)
            removals += [Removal(f"pruned:{name}", s, tuple(ids)) for s in seeds]
    return removals
