"""Damaged files are caught by their checksums before use: a gradient shard whose bytes changed
is reported in one log line and recomputed by ``--resume`` (scores as before); read outside a
resume, it is refused. (A damaged checkpoint is refused with exit 2: docs/errors.md.)"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from benchmarks.tiny import run_args, write_data
from flows.cli import main
from storage.errors import BadInput
from storage.gradient_shards import complete_shards, read_gradient_shard
from storage.metrics import read_metrics
from storage.store import Store
from tests.flows.run_files import scores_by_estimator


def _flip_a_gradient_byte(path) -> None:
    """Change one byte inside the gradient data (not the footer, which Parquet would reject)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


class _Lines(logging.Handler):
    """Collects the messages of one logger (Prefect's loggers don't propagate to pytest's)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_damaged_gradient_shard_is_recomputed_on_resume(tmp_path):
    store = Store(tmp_path / "store")
    assert main(run_args(store.root, write_data(tmp_path / "tiny.parquet"))) == 0
    run = store.latest_run()
    before = scores_by_estimator(run.dir)
    shards = sorted(run.gradients_root.rglob("part-*.parquet"))
    damaged = complete_shards(run.gradients_dir(0, "train"))[1]
    _flip_a_gradient_byte(damaged)
    with pytest.raises(BadInput, match="checksum mismatch"):
        read_gradient_shard(damaged)
    task_logs = _Lines()
    logging.getLogger("prefect.task_runs").addHandler(task_logs)
    try:
        assert main(["run", "--store", str(store.root), "--resume", run.run_id]) == 0
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(task_logs)

    lines = [line for line in task_logs.lines if "checksum mismatch" in line]
    assert len(lines) == 1 and str(damaged) in lines[0] and "recomputing" in lines[0], lines
    read_gradient_shard(damaged)  # whole again
    metrics = {(m["stage"], m["name"]): m["value"] for m in read_metrics(run.metrics).to_pylist()}
    assert metrics[("gradients", "shards_computed")] == 1
    assert metrics[("gradients", "shards_skipped")] == len(shards) - 1
    after = scores_by_estimator(run.dir)
    assert after.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
