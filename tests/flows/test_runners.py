"""The same small run on the thread pool and on a Dask LocalCluster of 2 worker processes: the
scores agree bit for bit, and the gradient shard tasks ran in the worker processes."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from storage.errors import BadInput
from storage.store import RunPaths, Store
from tasks.config import load_config
from tests.flows.conftest import SHARDED_RUN, sets

ESTIMATORS = ("ip", "tracin")


def _run(store: Store, *overrides: str) -> RunPaths:
    args = sets(*SHARDED_RUN, *overrides)
    assert main(["run", "--store", str(store.root), *args]) == 0
    return store.latest_run()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Store, RunPaths, RunPaths]:
    store = Store(tmp_path_factory.mktemp("runners"))
    threads = _run(store)
    dask = _run(store, "runner=dask", "dask.workers=2")
    return store, threads, dask


def _scores(run: RunPaths, estimator: str) -> tuple[np.ndarray, np.ndarray]:
    [path] = run.scores_root.glob(f"estimator={estimator}/target=*/part-0.parquet")
    table = pq.read_table(path)
    return table.column("sample_id").to_numpy(), table.column("score").to_numpy()


def test_dask_scores_equal_thread_scores(two_runs) -> None:
    _, threads, dask = two_runs
    for estimator in ESTIMATORS:
        ids_t, scores_t = _scores(threads, estimator)
        ids_d, scores_d = _scores(dask, estimator)
        np.testing.assert_array_equal(ids_d, ids_t)
        assert np.all(np.isfinite(scores_t)) and np.ptp(scores_t) > 0
        np.testing.assert_array_equal(scores_d, scores_t)


def _stage_params(store: Store, run: RunPaths, stage: str) -> dict[str, str]:
    client = MlflowClient(tracking_uri=store.mlflow_uri)
    parent = client.get_run((run.dir / "mlflow_run_id").read_text().strip())
    [child] = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`sieve.stage` = '{stage}'",
    )
    return child.data.params


def test_dask_shard_tasks_ran_in_two_worker_processes(two_runs) -> None:
    store, threads, dask = two_runs
    me = f":{os.getpid()} "
    on_threads = _stage_params(store, threads, "gradients")["workers"]
    assert on_threads.count("shards)") == 1 and me in on_threads  # this process
    on_dask = _stage_params(store, dask, "gradients")["workers"]
    assert on_dask.count("shards)") == 2 and me not in on_dask, on_dask


def test_dask_shard_task_runs_recorded_in_prefect(two_runs) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, TaskRunFilter, TaskRunFilterName

    _, _, dask = two_runs
    with get_client(sync_client=True) as client:
        [flow_run] = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter())
                      if r.parameters.get("run_id") == dask.run_id]
        shards = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="gradient-shard")),
        )
    files = list(dask.gradients_root.rglob("part-*.parquet"))
    assert flow_run.state.is_completed()
    assert len(shards) == len(files) > 2
    assert all(t.state.is_completed() for t in shards)


def test_ray_without_the_extra_is_one_line_bad_input(monkeypatch) -> None:
    import sys

    from flows.runner import task_runner

    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # as if the extra were missing
    with pytest.raises(BadInput, match=r"pip install -e '\.\[ray\]'"):
        task_runner(load_config(None, ["runner=ray"]))
