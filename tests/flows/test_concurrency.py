"""Four ``sieve run`` processes with different seeds started at once on one fresh store: all
complete, each in its own run folder with its own config and files, and MLflow (the store's
sqlite) holds four parent runs, each with its five stage runs.

The processes get no PREFECT_* variables, as from a plain shell: each starts its own Prefect
API with its home in the store, so they also race to create Prefect's and MLflow's databases.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

from benchmarks.tiny import SIEVE, STAGES, run_args, write_data
from storage.metrics import read_metrics
from storage.store import Store
from tasks.config import load_resolved_config

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (11, 12, 13, 14)


def test_four_runs_at_once_on_one_store(tmp_path):
    data = write_data(tmp_path / "tiny.parquet")
    store = Store(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(ROOT)
    logs = {seed: tmp_path / f"run-{seed}.log" for seed in SEEDS}
    procs = {}
    for seed in SEEDS:
        with open(logs[seed], "w") as out:
            procs[seed] = subprocess.Popen([*SIEVE, *run_args(store.root, data, seed)], env=env,
                                           cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    for seed, proc in procs.items():
        assert proc.wait(timeout=600) == 0, logs[seed].read_text()[-3000:]

    runs = store.list_runs()
    assert len(runs) == len(SEEDS)
    seeds = {load_resolved_config(run.config).seed: run for run in runs}
    assert sorted(seeds) == sorted(SEEDS)

    client = MlflowClient(tracking_uri=store.mlflow_uri)
    experiment = client.get_experiment_by_name("sieve")
    everything = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = {r.info.run_id: r for r in everything if "mlflow.parentRunId" not in r.data.tags}
    assert len(parents) == len(SEEDS)
    for seed, run in seeds.items():
        assert run.run_id in logs[seed].read_text()  # the process printed its own run id
        rows = read_metrics(run.metrics).to_pylist()
        stage_seconds = [m["stage"] for m in rows if m["name"] == "seconds" and
                         m["estimator"] is None]
        assert sorted(stage_seconds) == sorted(STAGES), "a stage's rows are missing or doubled"
        parent_id = (run.dir / "mlflow_run_id").read_text()
        parent = parents[parent_id]
        assert parent.data.tags["sieve.run_id"] == run.run_id
        assert parent.data.tags.get("sieve.status") == "complete"
        assert parent.info.status == "FINISHED"
        children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent_id]
        assert sorted(r.data.tags["sieve.stage"] for r in children) == sorted(STAGES)
        assert all(r.info.status == "FINISHED" for r in children)
        train = next(r for r in children if r.data.tags["sieve.stage"] == "train")
        assert train.data.params["seed"] == str(seed)  # no run logged into another's
