"""Section 2's worker: one pipeline stage in a fresh process, without Prefect or MLflow.

``python -m benchmarks.stages STAGE RUN_DIR OPTIONS_JSON`` prepares the stage's inputs
(untimed), resets the kernel's peak-RSS mark, runs the stage's body (timed), and prints one line
``BENCH_RESULT {json}``: seconds, RSS at the start of the body, peak RSS during it, and
stage-specific counts. Stages: ``data``, ``train``, ``gradients``, ``score:<estimator>``,
``query``. Each stage reads what the previous ones wrote into RUN_DIR (the run layout of
``storage.store.RunPaths``), and mirrors the pipeline task of the same name
(``tasks/train.py``, ``tasks/gradients.py``, ``tasks/score.py``, ``storage/views.py``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._measure import one_line, peak_rss_mib, release_memory, reset_peak, rss_mib
from storage.store import RunPaths
from storage.stored_gradients import StoredGradients
from tasks.config import Config, load_config

Body = Callable[[], dict[str, Any]]
TARGET = "val_loss"


def stage_data(run: RunPaths, config: Config, opts: dict) -> Body:
    """Load digits, flip 20 % of the train labels, write samples.parquet
    (``tasks.train.load_samples`` + ``prepare_samples`` for the digits default)."""
    from storage.atomic import write_parquet_atomic
    from workloads.datasets import load_digits, samples_table
    from workloads.noise import flip_labels

    def body() -> dict[str, Any]:
        d = config.data
        samples = load_digits(d.splits.model_dump(), config.seed)
        if d.noise > 0:
            noisy, corrupted = flip_labels(samples.label, d.noise, samples.num_classes,
                                           samples.indices("train"), config.seed)
            samples = samples.with_labels(noisy, samples.label.copy(), corrupted)
        write_parquet_atomic(samples_table(samples), run.samples)
        return {"samples": len(samples.label),
                "split_sizes": {s: len(samples.indices(s)) for s in ("train", "val", "test")}}

    return body


def stage_train(run: RunPaths, config: Config, opts: dict) -> Body:
    """Train the attributed model, saving every checkpoint and the index
    (``tasks.train._train_and_capture`` for model 0)."""
    from storage.checkpoints import CheckpointRecord, save_checkpoint, write_checkpoint_index
    from tasks.workload import load_workload
    from workloads.models import seeded_model
    from workloads.training import train

    work = load_workload(run, config)
    idx = work.rows("train")

    def body() -> dict[str, Any]:
        model = seeded_model(work.factory, config.seed)
        records: list[CheckpointRecord] = []

        def capture(event) -> None:
            path, sha = save_checkpoint(run.checkpoints_dir, event.step, event.state_dict)
            records.append(CheckpointRecord(event.index, event.step, event.epoch, event.lr,
                                            str(path), sha, event.step_lr, 0))

        train(model, work.x[idx], work.y[idx], work.recipe, config.seed,
              checkpoints=config.train.checkpoints, on_checkpoint=capture)
        write_checkpoint_index(run.checkpoints_dir, records)
        return {"samples": len(idx) * work.recipe.epochs, "checkpoints": len(records),
                "epochs": work.recipe.epochs}

    return body


def stage_gradients(run: RunPaths, config: Config, opts: dict) -> Body:
    """Per-sample gradients of the train and target splits at every checkpoint, one Parquet
    shard per ``gradients.shard_size`` rows (``tasks.gradients.gradient_shard``)."""
    from estimators.per_sample import parameter_count, parameter_order, per_sample_gradients
    from storage.checkpoints import load_state_dict, read_checkpoint_index
    from storage.gradient_shards import ShardMeta, shard_path, write_gradient_shard
    from tasks.workload import load_workload

    work = load_workload(run, config)
    records = read_checkpoint_index(run.checkpoints_dir)
    splits = ["train", config.targets.split]
    size = config.gradients.shard_size

    def body() -> dict[str, Any]:
        rows = shards = written = 0
        compute = write = first = 0.0
        for record in records:
            for split in splits:
                split_rows = work.rows(split)
                for part, start in enumerate(range(0, len(split_rows), size)):
                    chosen = split_rows[start : start + size]
                    model = work.factory()
                    model.load_state_dict(load_state_dict(record.path, record.sha256))
                    model.eval()
                    began = time.perf_counter()
                    grads = per_sample_gradients(model, work.x[chosen], work.y[chosen])
                    took = time.perf_counter() - began
                    first = took if shards == 0 else first
                    compute += took
                    meta = ShardMeta(
                        dtype="float32", projection=None, k=grads.shape[1], seed=None,
                        parameter_order=parameter_order(model),
                        parameter_count=parameter_count(model), checkpoint=record.checkpoint,
                        model_hash=record.sha256, split=split,
                    )
                    path = shard_path(run.gradients_dir(record.checkpoint, split), part)
                    ids = work.samples.sample_id[chosen].astype(np.int64)
                    began = time.perf_counter()
                    write_gradient_shard(path, ids, grads, meta)
                    write += time.perf_counter() - began
                    rows += len(chosen)
                    shards += 1
                    written += path.stat().st_size
        return {"samples": rows, "shards": shards, "bytes": written,
                "checkpoints": len(records), "splits": splits,
                "per_sample_gradients_s": compute, "first_shard_gradients_s": first,
                "write_shards_s": write}

    return body


def stage_score(name: str) -> Callable[[RunPaths, Config, dict], Body]:
    """Estimator ``name`` scores every train sample against the summed val loss; only
    ``estimator.score`` is timed (as ``tasks.score.score_one`` times it); the scores are
    written afterwards for the query stage."""

    def prepare(run: RunPaths, config: Config, opts: dict) -> Body:
        import pyarrow as pa

        from estimators.base import Checkpoint, ScoringContext
        from estimators.registry import make_estimator
        from storage.atomic import write_parquet_atomic
        from storage.checkpoints import load_state_dict, read_checkpoint_index
        from tasks.workload import load_workload

        configured = {e.name: e.options for e in config.estimators}
        estimator = make_estimator(name, **configured.get(name, {}))
        work = load_workload(run, config)
        train, target = work.rows("train"), work.rows(config.targets.split)
        records = [r for r in read_checkpoint_index(run.checkpoints_dir) if r.model == 0]

        def checkpoint(r) -> Checkpoint:
            return Checkpoint(r.checkpoint, r.step, r.lr, step_lr=r.step_lr,
                              load=lambda: load_state_dict(r.path, r.sha256))

        ctx = ScoringContext(
            model_factory=work.factory, checkpoints=[checkpoint(r) for r in records],
            train_ids=work.samples.sample_id[train], train_x=work.x[train],
            train_y=work.y[train], target_x=work.x[target], target_y=work.y[target],
            gradients=StoredGradients(run, config.targets.split),
            weight_decay=config.train.weight_decay, seed=config.seed,
            target_ids=work.samples.sample_id[target], batch_size=config.train.batch_size,
        )

        def body() -> dict[str, Any]:
            attribution = estimator.score(ctx)
            body.attribution = attribution  # written after the timed region
            return {"samples": len(attribution.score)}

        def write() -> None:
            a = body.attribution
            n = len(a.score)
            suspicion = a.suspicion if a.suspicion is not None else np.full(n, np.nan)
            table = pa.table({"sample_id": a.sample_ids.astype(np.int64),
                              "score": a.score.astype(np.float64),
                              "suspicion": np.asarray(suspicion, dtype=np.float64)})
            write_parquet_atomic(table, run.scores_dir(name, TARGET) / "part-0.parquet")

        body.after = write
        return body

    return prepare


QUERY = ("select sample_id, score from scores where estimator = 'tracin' "
         "order by score limit 100")


def stage_query(run: RunPaths, config: Config, opts: dict) -> Body:
    """``sieve query``'s path: open the run's DuckDB views, then the top-100 most harmful."""
    from storage.views import open_run, run_query

    def body() -> dict[str, Any]:
        con = open_run(run)
        _, rows = run_query(con, opts.get("query", QUERY))
        again = []
        for _ in range(3):
            started = time.perf_counter()
            run_query(con, opts.get("query", QUERY))
            again.append(time.perf_counter() - started)
        con.close()
        return {"rows": len(rows), "warm_query_seconds": sorted(again)[1]}

    return body


STAGES = {"data": stage_data, "train": stage_train, "gradients": stage_gradients,
          "query": stage_query}


def run_stage(stage: str, run_dir: Path, opts: dict) -> dict[str, Any]:
    torch.set_num_threads(1)
    config = load_config(overrides=opts.get("overrides", []))
    run = RunPaths("bench", run_dir)
    prepare = stage_score(stage.split(":", 1)[1]) if stage.startswith("score:") else STAGES[stage]
    result: dict[str, Any] = {"stage": stage}
    try:
        body = prepare(run, config, opts)
        release_memory()
        reset_peak()
        result["rss_start_mib"] = rss_mib()
        started, cpu = time.perf_counter(), time.process_time()
        result |= body()
        result["cpu_seconds"] = time.process_time() - cpu
        result["seconds"] = time.perf_counter() - started
        result["peak_rss_mib"] = peak_rss_mib()
        after = getattr(body, "after", None)
        if after is not None:
            after()
    except Exception as exc:  # noqa: BLE001 - reported as the stage's failure
        result["failed"] = one_line(exc)
    return result


def main(argv: list[str]) -> int:
    stage, run_dir, opts = argv[0], Path(argv[1]), json.loads(argv[2] if len(argv) > 2 else "{}")
    print("BENCH_RESULT " + json.dumps(run_stage(stage, run_dir, opts)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
