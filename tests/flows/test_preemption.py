"""Preemption: SIGTERM (what schedulers and Kubernetes send) or SIGINT (Ctrl-C) to ``sieve run``
in each stage. Sieve stops within seconds, with the exit code of the signal (143, 130), leaves
no partial or hidden file in the run folder, marks the run interrupted (its ``status`` file,
``sieve runs``, MLflow: parent and stage run KILLED) and prints the ``--resume`` command, which
then completes the run with scores bit-identical to an uninterrupted run's.

The stage trials fork from the preloaded interpreter of the crash test (sharing this process's
Prefect API). One more trial starts ``sieve run`` as a new user would, a fresh interpreter with
no PREFECT_* settings (so it starts its own temporary Prefect API server), and checks that no
process it started outlives it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from mlflow.tracking import MlflowClient

from benchmarks.tiny import STAGES, run_args
from flows.cli import main
from storage.store import RunPaths, Store
from tests.flows.run_files import scores_by_estimator
from tests.flows.test_crash import (  # noqa: F401  (fixtures: the preloaded sieve, a reference)
    ROOT,
    Preloaded,
    _assert_whole_files,
    _finished_stages,
    _wait_started,
    reference,
    sieve,
)

TRIALS = [(stage, signal.SIGTERM) for stage in STAGES] + [("gradients", signal.SIGINT)]
# the installed console script, as a new user runs it (else the same entry point via -m)
CONSOLE = ([str(Path(sys.executable).parent / "sieve")]
           if (Path(sys.executable).parent / "sieve").exists() else
           [sys.executable, "-m", "flows.cli"])
STOP_LIMIT_S = 20.0  # generous for a loaded 2-core machine (load average ~10); figures are printed


def _wait_exit(exit_file: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while not exit_file.exists():
        assert time.monotonic() < deadline, "sieve did not stop"
        time.sleep(0.01)
    return int(exit_file.read_text())


def _resume_command(log: str, run: RunPaths) -> list[str]:
    """The ``sieve ...`` arguments of the resume line the run printed."""
    [line] = [x for x in log.splitlines() if "resume it with: sieve " in x]
    assert line.startswith("interrupted by SIG") and f"run {run.run_id} stopped" in line, line
    return shlex.split(line.split("resume it with: sieve ", 1)[1])


def _assert_interrupted(store: Store, run: RunPaths, capsys) -> None:
    """No hidden (temporary, lock) file in the run folder; status interrupted in the run folder,
    in ``sieve runs`` and in MLflow (the parent run and the stage it was in: KILLED)."""
    hidden = [p for p in run.dir.rglob(".*")]
    assert not hidden, f"hidden files left in the run folder: {hidden}"
    _assert_whole_files(run)
    assert run.status.read_text() == "interrupted"
    capsys.readouterr()
    assert main(["runs", "--store", str(store.root)]) == 0
    [row] = [x for x in capsys.readouterr().out.splitlines() if run.run_id in x]
    assert "interrupted" in row, row
    client = MlflowClient(tracking_uri=store.mlflow_uri)
    parent = client.get_run((run.dir / "mlflow_run_id").read_text().strip())
    assert parent.info.status == "KILLED"
    assert parent.data.tags["sieve.status"] == "interrupted"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [c.info.status for c in children].count("KILLED") <= 1
    statuses = {c.data.tags["sieve.stage"]: c.info.status for c in children}
    assert set(statuses.values()) <= {"FINISHED", "KILLED"}, statuses


def _assert_resumes_to_reference(args: list[str], run: RunPaths, expected, run_sieve) -> None:
    assert run_sieve(args) == 0
    assert _finished_stages(run) == set(STAGES)
    assert run.status.read_text() == "complete"
    resumed = scores_by_estimator(run.dir)
    assert resumed.keys() == expected.keys()
    for name in expected:  # bit-identical
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)


@pytest.mark.parametrize(("stage", "signum"), TRIALS,
                         ids=[f"{s}-{g.name}" for s, g in TRIALS])
def test_signal_stops_the_run_cleanly_and_resume_completes(sieve, reference,  # noqa: F811
                                                           tmp_path, capsys, stage, signum):
    data, expected, _ = reference
    store = Store(tmp_path / "store")
    pid, exit_file = sieve.start(run_args(store.root, data))
    run = _wait_started(stage, store, exit_file)
    sent = time.monotonic()
    os.kill(pid, signum)
    code = _wait_exit(exit_file, 60)
    stopped = time.monotonic() - sent
    assert code == 128 + signum
    assert stage not in _finished_stages(run), f"{stage} ended before the signal"
    assert stopped < STOP_LIMIT_S
    _assert_interrupted(store, run, capsys)
    args = _resume_command(exit_file.with_suffix(".log").read_text(), run)
    assert args == ["run", "--store", str(store.root), "--resume", run.run_id]
    _assert_resumes_to_reference(args, run, expected, sieve.run)
    print(f"\n{signum.name} in {stage}: stopped {stopped:.2f} s after the signal (exit {code}); "
          "resumed, scores bit-identical")


def test_sigterm_as_a_new_user_leaves_no_process(reference, tmp_path, capsys):  # noqa: F811
    """A fresh ``sieve run`` with no PREFECT_* settings starts its own Prefect API server
    (uvicorn); SIGTERM during the gradient stage stops it and every process it started."""
    data, expected, _ = reference
    store = Store(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([*CONSOLE, *run_args(store.root, data)], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        run = _wait_started("gradients", store, tmp_path / "never")
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(p.cmdline()) for p in started), started
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        stopped = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 143 and stopped < STOP_LIMIT_S
    _, alive = psutil.wait_procs(started, timeout=5)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    assert "gradients" not in _finished_stages(run)
    _assert_interrupted(store, run, capsys)
    args = _resume_command((tmp_path / "stderr").read_text(), run)
    _assert_resumes_to_reference(args, run, expected, main)
    print(f"\nSIGTERM as a new user, gradients stage: stopped {stopped:.2f} s after the signal, "
          f"{len(started)} child processes, none left")
