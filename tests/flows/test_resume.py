"""A run killed (SIGKILL) during the gradient stage resumes without recomputing any complete
shard and ends with exactly the scores of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from flows.cli import main
from storage.metrics import read_metrics
from storage.store import Store
from tests.flows.conftest import SMALL, sets
from tests.flows.run_files import scores_by_estimator

SIEVE = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]


def _shards(run_dir: Path) -> dict[Path, tuple[int, int]]:
    files = (run_dir / "gradients").rglob("part-*.parquet")
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}


def test_killed_run_resumes_from_complete_shards(small_run, tmp_path):
    _, reference = small_run
    store = Store(tmp_path / "store")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [*SIEVE, "run", "--store", str(store.root), *sets(*SMALL)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            runs = store.list_runs() if store.runs_dir.exists() else []
            if runs and len(_shards(runs[0].dir)) >= 5:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run = store.latest_run()
    before = _shards(run.dir)
    assert len(before) >= 5, "the run never reached the gradient stage"
    total = len(_shards(reference.dir))
    assert len(before) < total, "the gradient stage finished before the kill; nothing to resume"
    assert not (run.dir / "scores").exists()

    assert main(["run", "--store", str(store.root), "--resume", run.run_id]) == 0

    after = _shards(run.dir)
    assert len(after) == total
    assert all(after[p] == before[p] for p in before), "a complete shard was rewritten"
    metrics = {(m["stage"], m["name"]): m["value"] for m in read_metrics(run.metrics).to_pylist()}
    assert metrics[("gradients", "shards_skipped")] == len(before)
    assert metrics[("gradients", "shards_computed")] == total - len(before)
    resumed, uninterrupted = scores_by_estimator(run.dir), scores_by_estimator(reference.dir)
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)
