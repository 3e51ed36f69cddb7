"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Uses ``MlflowClient`` with explicit run ids (never the thread-local active-run stack), so stage
runs created from Prefect worker threads nest correctly. Default backend: the store's
``mlflow.db`` (sqlite) with artifacts under ``mlartifacts/``, both in the store's local folder
(``Store.local_dir``: the store itself, or a local stand-in for a URL store).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from storage.location import StorePath, is_remote, store_path  # noqa: E402
from storage.locks import file_lock  # noqa: E402
from storage.store import Store  # noqa: E402

_BATCH = 900  # MLflow's log_batch accepts at most 1000 metrics per call


@dataclass(frozen=True)
class Tracking:
    """Where a pipeline run is tracked: serializable, so tasks can rebuild a client."""

    uri: str
    experiment_id: str
    parent_run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)

    def start_stage(self, name: str) -> StageRun:
        client = self.client()
        run = client.create_run(
            self.experiment_id,
            run_name=name,
            tags={"mlflow.parentRunId": self.parent_run_id, "sieve.stage": name},
        )
        return StageRun(client, run.info.run_id)


def start_tracking(
    store: Store, uri: str | None, experiment: str, run_id: str, resume_parent: str | None
) -> Tracking:
    """Open (or create) the experiment and the parent run named after the Sieve run id.

    Creating the database (MLflow migrates a new sqlite file) and the experiment is done under
    the store's lock ``.mlflow.lock`` (in its local folder): concurrent runs on one store would
    otherwise race ("table already exists", "experiment already exists").
    """
    uri = uri or store.mlflow_uri
    client = MlflowClient(tracking_uri=uri)
    with file_lock(store.local_dir / ".mlflow.lock"):
        found = client.get_experiment_by_name(experiment)
        if found is None:
            local = uri == store.mlflow_uri
            location = (store.artifact_root / experiment).as_uri() if local else None
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = found.experiment_id
    if resume_parent:
        _close_stages(client, experiment_id, resume_parent, "KILLED")  # left by a SIGKILL
        client.update_run(resume_parent, status="RUNNING")
        return Tracking(uri, experiment_id, resume_parent)
    parent = client.create_run(experiment_id, run_name=run_id, tags={"sieve.run_id": run_id})
    return Tracking(uri, experiment_id, parent.info.run_id)


def _close_stages(client: MlflowClient, experiment_id: str, parent: str, status: str) -> None:
    """End with ``status`` the stage runs of ``parent`` still RUNNING: left by a process killed
    with SIGKILL, or by an interruption that landed while a stage run was being opened."""
    running = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = "
        "'RUNNING'")
    for run in running:
        client.set_terminated(run.info.run_id, status)


def finish_tracking(tracking: Tracking, status: str) -> None:
    """End the parent run with MLflow ``status`` (FINISHED, FAILED, KILLED); on FAILED or
    KILLED, the stage runs still open end so too."""
    client = tracking.client()
    if status != "FINISHED":
        _close_stages(client, tracking.experiment_id, tracking.parent_run_id, status)
    client.set_terminated(tracking.parent_run_id, status)


class StageRun:
    """A child run: parameters, metrics (batched) and artifacts, closed by ``end``."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self._metrics: list[Metric] = []

    def params(self, values: dict[str, Any]) -> None:
        params = [Param(k, str(v)[:6000]) for k, v in values.items()]
        self.client.log_batch(self.run_id, params=params)

    def metric(self, key: str, value: float, step: int = 0) -> None:
        self._metrics.append(Metric(key, float(value), int(time.time() * 1000), step))

    def artifact(self, path: StorePath, folder: str | None = None) -> None:
        log_store_file(self.client, self.run_id, path, folder)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        """Log the batched metrics and end the run with MLflow ``status`` (FINISHED, FAILED,
        KILLED)."""
        for i in range(0, len(self._metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=self._metrics[i : i + _BATCH])
        self._metrics.clear()
        self.client.set_terminated(self.run_id, status)


def log_store_file(
    client: MlflowClient, run_id: str, path: StorePath, folder: str | None = None
) -> None:
    """Log a store file as an artifact of MLflow run ``run_id``; a URL's object is first
    fetched to a local temporary file of the same name (MLflow logs local files)."""
    path = store_path(path)
    if not is_remote(path):
        client.log_artifact(run_id, str(path), folder)
        return
    with tempfile.TemporaryDirectory(prefix="sieve-artifact-") as local:
        copy = Path(local) / path.name
        path.fs.get_file(path.path, str(copy))
        client.log_artifact(run_id, str(copy), folder)


def tag_run(tracking: Tracking, tags: dict[str, str]) -> None:
    tracking.client().log_batch(
        tracking.parent_run_id, tags=[RunTag(k, v) for k, v in tags.items()]
    )
