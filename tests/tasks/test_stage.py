"""A stage's record: a signal that lands inside a write to the MLflow sqlite store (its write
lock still held by the cut-short frames) does not stall ending the stage run as KILLED."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from storage.store import Store
from storage.tracking import start_tracking
from tasks.interrupts import Interrupted
from tasks.stage import stage


def _signalled_inside_a_write(database: Path) -> None:
    """Take sqlite's write lock, as an MLflow write does, and be interrupted holding it (the
    connection is a local of this frame, alive in the exception's traceback)."""
    connection = sqlite3.connect(database, timeout=0)
    connection.execute("BEGIN IMMEDIATE")
    raise Interrupted(signal.SIGTERM)


def test_a_signal_inside_an_mlflow_write_ends_the_stage_killed_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    tracking = start_tracking(store, None, "stage-test", "run-a", None)
    database = Path(store.mlflow_uri.removeprefix("sqlite:///"))
    assert database.exists()
    started = time.monotonic()
    with pytest.raises(Interrupted), stage(store.run("run-a"), tracking, "score"):
        _signalled_inside_a_write(database)
    seconds = time.monotonic() - started
    client = MlflowClient(tracking_uri=store.mlflow_uri)
    [child] = client.search_runs([tracking.experiment_id],
                                 f"tags.mlflow.parentRunId = '{tracking.parent_run_id}'")
    assert child.info.status == "KILLED"
    assert seconds < 10, f"ending the stage waited {seconds:.1f} s on sqlite's lock"
