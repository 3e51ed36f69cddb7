"""Crash safety: ``sieve run`` killed with SIGKILL at a seeded random point inside each stage
(train, gradients, score, prune, retrain; two trials per stage, ten in all). After every kill
each file of the run a reader can see is whole, and ``sieve run --resume`` completes the run
with scores bit-identical to an uninterrupted run's.

Every run (the reference, the killed ones, the resumes) is its own process, forked from a
preloaded interpreter (``preloaded_sieve.py``) and sharing this process's Prefect API, so a
trial pays neither the imports nor a Prefect server start. A trial's kill time: wait until the
stage has started (the previous stage's rows are in metrics.parquet, or for train,
samples.parquet exists), then a seeded random fraction in [0, 0.8) of that stage's duration in
the reference run. If the stage had ended by then, the trial is retried with half the delay.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.tiny import STAGES, run_args, write_data
from storage.atomic import read_parquet_table
from storage.gradient_shards import read_gradient_shard
from storage.metrics import read_metrics
from storage.store import RunPaths, Store
from tasks.config import load_resolved_config
from tests.flows.run_files import scores_by_estimator

ROOT = Path(__file__).resolve().parents[2]
TRIALS = [(stage, n) for n in range(2) for stage in STAGES]
ATTEMPTS = 3


class Preloaded:
    """Client of ``preloaded_sieve``: ``start`` forks a run, ``wait`` its exit code."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.folder = folder
        self.lock = threading.Lock()
        self.count = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.flows.preloaded_sieve"], env=env, cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def start(self, args: list[str]) -> tuple[int, Path]:
        """Fork a child running ``sieve ARGS``; returns (pid, its exit-code file)."""
        with self.lock:
            self.count += 1
            log, exit_file = (self.folder / f"child-{self.count}.{s}" for s in ("log", "exit"))
            request = {"args": args, "log": str(log), "exit": str(exit_file)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            return int(self.proc.stdout.readline()), exit_file

    def run(self, args: list[str], timeout: float = 300) -> int:
        """Run ``sieve ARGS`` in a child to its end; its exit code."""
        _, exit_file = self.start(args)
        deadline = time.monotonic() + timeout
        while not exit_file.exists():
            assert time.monotonic() < deadline, f"sieve {args} did not finish"
            time.sleep(0.02)
        return int(exit_file.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _finished_stages(run: RunPaths) -> set[str]:
    return set(read_metrics(run.metrics)["stage"].to_pylist())


def _started(stage: str, run: RunPaths | None) -> bool:
    if run is None:
        return False
    if stage == "train":
        return run.samples.exists()
    return STAGES[STAGES.index(stage) - 1] in _finished_stages(run)


@pytest.fixture(scope="module")
def sieve(tmp_path_factory):
    """The preloaded ``sieve``, its runs sharing this process's Prefect API."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    from flows.environment import start_local_api

    start_local_api()
    url = PREFECT_API_URL.value() or SubprocessASGIServer().api_url
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_API_URL=url)
    preloaded = Preloaded(env, tmp_path_factory.mktemp("children"))
    yield preloaded
    preloaded.close()


@pytest.fixture(scope="module")
def reference(sieve, tmp_path_factory):
    """One uninterrupted tiny run: (data file, scores, seconds per stage)."""
    data = write_data(tmp_path_factory.mktemp("data") / "tiny.parquet")
    store = Store(tmp_path_factory.mktemp("reference"))
    assert sieve.run(run_args(store.root, data)) == 0
    run = store.latest_run()
    metrics = read_metrics(run.metrics).to_pylist()
    seconds = {m["stage"]: m["value"] for m in metrics
               if m["name"] == "seconds" and m["estimator"] is None}
    assert set(seconds) == set(STAGES)
    return data, scores_by_estimator(run.dir), seconds


def _wait_started(stage: str, store: Store, exit_file: Path) -> RunPaths:
    """The run, once ``stage`` has started (the run must not exit first; 300 s at most)."""
    deadline = time.monotonic() + 300
    run = None
    while not _started(stage, run):
        assert not exit_file.exists(), f"the run exited before {stage}"
        assert time.monotonic() < deadline, f"{stage} never started"
        runs = store.list_runs() if store.runs_dir.exists() else []
        run = runs[0] if runs else None
        time.sleep(0.005)
    return run


def _kill_inside(sieve: Preloaded, stage: str, store: Store, data: Path, delay: float) -> bool:
    """Start a tiny run; SIGKILL it ``delay`` s after ``stage`` starts. True if the kill landed
    inside the stage (it had started and not finished)."""
    pid, exit_file = sieve.start(run_args(store.root, data))
    try:
        run = _wait_started(stage, store, exit_file)
        kill_at = time.monotonic() + delay
        while time.monotonic() < kill_at and stage not in _finished_stages(run):
            time.sleep(0.005)
    finally:
        os.kill(pid, signal.SIGKILL)
    while True:  # wait until it is gone (the preloaded parent reaps it)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.005)
    return not exit_file.exists() and stage not in _finished_stages(run)


def _assert_whole_files(run: RunPaths) -> None:
    """Every file a reader can see (not hidden) is complete and passes its checks."""
    for path in sorted(run.dir.rglob("*")):
        if not path.is_file() or any(p.startswith(".") for p in path.relative_to(run.dir).parts):
            continue
        if path.parent.parent.parent.name == "gradients":
            read_gradient_shard(path)  # schema, metadata and sha256 checksum
        elif path.suffix == ".parquet":
            read_parquet_table(path)
        elif path.suffix == ".pt":
            assert torch.load(path, map_location="cpu", weights_only=True)
        elif path.name == "config.yaml":
            load_resolved_config(path)
        elif path.name == "mlflow_run_id":
            assert len(path.read_text()) == 32
        elif path.suffix == ".png":
            assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), path
        else:  # other files (text, reports) are written atomically too; no format check here
            path.read_bytes()


def _trial(sieve: Preloaded, reference, stage: str, n: int, tmp_path: Path) -> tuple[int, float]:
    """Kill a run inside ``stage`` (retrying with a shorter delay if the stage ended first),
    check its files, resume it, compare its scores; returns (attempts, the delay that hit)."""
    data, expected, seconds = reference
    delay = random.Random(f"{stage}-{n}").uniform(0, 0.8) * seconds[stage]
    for attempt in range(1, ATTEMPTS + 1):
        store = Store(tmp_path / f"store-{stage}-{n}-{attempt}")
        if _kill_inside(sieve, stage, store, data, delay):
            break
        delay /= 2
    else:
        pytest.fail(f"{ATTEMPTS} kills all missed the {stage} stage")
    run = store.latest_run()
    _assert_whole_files(run)
    assert sieve.run(["run", "--store", str(store.root), "--resume", run.run_id]) == 0, stage
    assert _finished_stages(run) == set(STAGES)
    assert not list(run.dir.rglob(".*.tmp-*")), "a killed writer's temporary file was left"
    resumed = scores_by_estimator(run.dir)
    assert resumed.keys() == expected.keys()
    for name in expected:  # bit-identical
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=f"{stage} #{n}")
    return attempt, delay


def test_killed_runs_resume_to_the_uninterruptedscores_by_estimator(sieve, reference, tmp_path):
    with ThreadPoolExecutor(max_workers=2) as pool:  # two trials at a time, on two cores
        attempts = list(pool.map(lambda t: _trial(sieve, reference, *t, tmp_path), TRIALS))
    seconds = reference[2]
    for (stage, n), (tries, delay) in zip(TRIALS, attempts, strict=True):
        print(f"crash trial {stage} #{n}: killed {delay:.3f} s into the stage (reference stage "
              f"{seconds[stage]:.3f} s) on attempt {tries}; resumed, scores bit-identical")
