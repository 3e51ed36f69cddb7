"""A train.models = 2 pipeline run, shared by the ensemble tests."""

from __future__ import annotations

import pytest

from flows.cli import main
from storage.checkpoints import read_checkpoint_index
from storage.store import Store
from tasks.config import load_resolved_config

SETTINGS = ["train.epochs=2", "train.checkpoints=1", "train.models=2", "prune.by=ip",
            "prune.seeds=1", "estimators=[random,loss,ip,if_cg]", "targets.pairwise=true",
            "targets.test_samples=12", "gradients.shard_size=256"]


@pytest.fixture(scope="session")
def ensemble_run(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("store"))
    args = [a for s in SETTINGS for a in ("--set", s)]
    assert main(["run", "--store", str(store.root), *args]) == 0
    run = store.latest_run()
    config = load_resolved_config(run.config)
    records = read_checkpoint_index(run.checkpoints_dir)
    assert sorted({r.model for r in records}) == [0, 1]
    return run, config, records


