"""One real pipeline run (Prefect flow, MLflow sqlite store, Parquet, DuckDB) shared by the
flow tests: the default config made small (MLP, 6 epochs, 3 checkpoints, 2 retrain seeds)."""

from __future__ import annotations

import pytest

from flows.cli import main
from storage.store import RunPaths, Store

SMALL = [
    "train.epochs=6",
    "train.checkpoints=3",
    "prune.seeds=2",
    "gradients.shard_size=32",
]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> tuple[Store, RunPaths]:
    store = Store(tmp_path_factory.mktemp("store"))
    assert main(["run", "--store", str(store.root), *sets(*SMALL)]) == 0
    return store, store.latest_run()
