"""A Dask worker killed while it writes a gradient shard: a run on a LocalCluster of 2 worker
processes; the test watches the run's gradient folders for a shard's temporary file (its name
carries the writer's pid) and sends that worker SIGKILL. Dask reschedules the shard task on a
live worker (``flows.runner.ALLOWED_FAILURES``; the nanny starts a new worker process), the
run completes, every shard exists once and whole, the killed writer's temporary file is gone,
and the scores equal a thread-pool run's bit for bit.

Ray is not run here: it is an optional extra (``.[ray]``, not installed for the tests) and its
start costs tens of seconds on 2 cores (docs/reliability.md).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from flows.cli import main
from storage.gradient_shards import read_gradient_shard
from storage.store import Store
from tests.flows.conftest import sets
from tests.flows.run_files import scores_by_estimator

ROOT = Path(__file__).resolve().parents[2]
SIEVE = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]
# unprojected MLP gradients (4,810 floats a row), 128-row shards of 2.4 MB: writes last a while
RUN = ["train.epochs=2", "train.checkpoints=1", "estimators=[ip, tracin]", "prune.by=tracin",
       "prune.seeds=1", "gradients.shard_size=128"]
TEMPORARY = re.compile(r"^\.part-\d+\.parquet\.tmp-(\d+)-[0-9a-f]+$")


def _prefect_api() -> str:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    from flows.environment import start_local_api

    start_local_api()
    return PREFECT_API_URL.value() or SubprocessASGIServer().api_url


def _writing(root: Path) -> tuple[int, Path] | None:
    """(pid, path) of a shard being written under ``root``, if any."""
    for folder, _, names in os.walk(root):
        for name in names:
            m = TEMPORARY.match(name)
            if m:
                return int(m.group(1)), Path(folder) / name
    return None


def test_worker_killed_mid_shard_is_rescheduled(tmp_path):
    threads = Store(tmp_path / "threads")
    assert main(["run", "--store", str(threads.root), *sets(*RUN)]) == 0
    expected = scores_by_estimator(threads.latest_run().dir)

    store = Store(tmp_path / "dask")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_API_URL=_prefect_api())
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(
            [*SIEVE, "run", "--store", str(store.root),
             *sets(*RUN, "runner=dask", "dask.workers=2")], env=env, stdout=log, stderr=log)
    killed = None
    try:
        deadline = time.monotonic() + 400
        while killed is None and proc.poll() is None:
            assert time.monotonic() < deadline, "no shard write was seen"
            found = _writing(store.root / "runs")
            if found and found[0] != proc.pid:
                os.kill(found[0], signal.SIGKILL)
                killed = found
        code = proc.wait(400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the run ended before a shard write was caught"
    assert code == 0, (tmp_path / "log").read_text()[-3000:]
    run = store.latest_run()
    assert not killed[1].exists(), "the killed writer's temporary file was left"
    assert not list(run.dir.rglob(".*.tmp-*"))
    ids = []
    reference_shards = sorted(p.relative_to(threads.latest_run().dir) for p in
                              threads.latest_run().gradients_root.rglob("part-*.parquet"))
    shards = sorted(p.relative_to(run.dir) for p in run.gradients_root.rglob("part-*.parquet"))
    assert shards == reference_shards  # each shard once, no extra one
    for shard in run.gradients_root.glob("*/split=train/part-*.parquet"):
        ids.extend(read_gradient_shard(shard)[0].tolist())  # whole: checksum verified
    assert len(ids) == len(set(ids)), "a sample's gradient was stored twice"
    resumed = scores_by_estimator(run.dir)
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
    print(f"\nkilled Dask worker pid {killed[0]} while it wrote {killed[1].name}; the run "
          f"completed with {len(shards)} shards, scores bit-identical to the thread pool's")
