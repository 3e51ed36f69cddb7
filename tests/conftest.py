"""Test-wide settings: one thread for torch, Prefect's local API with its home in a temp dir;
and ``small_run``, one real pipeline run (Prefect flow, MLflow sqlite store, Parquet, DuckDB)
shared by the flow and presentation tests: the default config made small (MLP, 6 epochs,
3 checkpoints, 2 retrain seeds)."""

import logging
import os
import tempfile

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="sieve-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Prefect logs "Stopping temporary server" at interpreter exit, after pytest has closed the
# captured stream it logs to; don't print a traceback for that.
logging.raiseExceptions = False


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """(Store, RunPaths) of one finished small ``sieve run``."""
    from flows.cli import main
    from storage.store import Store
    from tests.flows.conftest import SMALL, sets

    store = Store(tmp_path_factory.mktemp("store"))
    assert main(["run", "--store", str(store.root), *sets(*SMALL)]) == 0
    return store, store.latest_run()
