"""A real ``sieve serve`` for the serve and browser tests: a subprocess on free ports with a tiny
config (2 epochs, IP only, 1 retrain seed) and the pipeline deployment scheduled every minute.
Stopping it (SIGINT, as Ctrl-C) checks that it exits 0 and leaves no process or port behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from storage.store import Store

TINY_SERVE = """\
train: {epochs: 2, checkpoints: 1}
estimators: [ip]
prune: {by: ip, seeds: 1}
gradients: {shard_size: 512}
serve:
  schedules: {pipeline: "* * * * *"}
"""
STARTUP_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60


@dataclass
class Served:
    """A running ``sieve serve``: its store, URLs and process."""

    store: Store
    prefect: str
    mlflow: str
    process: subprocess.Popen
    log: Path

    def api(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST (or, without a body, GET) the Prefect API."""
        url = f"{self.prefect}/api/{path}"
        response = (httpx.post(url, json=body, timeout=30) if body is not None
                    else httpx.get(url, timeout=30))
        response.raise_for_status()
        return response.json()

    def deployment_id(self, name: str) -> str:
        found = self.api("deployments/filter", {"deployments": {"name": {"any_": [name]}}})
        assert len(found) == 1, found
        return found[0]["id"]

    def flow_runs(self, deployment: str) -> list[dict[str, Any]]:
        """The deployment's flow runs (entry flows, not their subflows)."""
        body = {"deployments": {"id": {"any_": [self.deployment_id(deployment)]}}}
        return self.api("flow_runs/filter", body)

    def wait_for_run(self, deployment: str, wanted: Callable[[dict[str, Any]], bool],
                     timeout_s: float) -> dict[str, Any]:
        """The first flow run of ``deployment`` that is ``wanted`` and COMPLETED; fails when
        one such run ends in another final state, or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for run in self.flow_runs(deployment):
                if not wanted(run):
                    continue
                if run["state_type"] == "COMPLETED":
                    return run
                assert run["state_type"] not in ("FAILED", "CRASHED", "CANCELLED"), \
                    f"flow run {run['name']} ended {run['state_type']}: {self.tail()}"
            assert self.process.poll() is None, f"sieve serve exited: {self.tail()}"
            time.sleep(1)
        raise AssertionError(f"no wanted {deployment} run completed in {timeout_s} s: "
                             f"{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _default_sigint() -> None:
    """As a terminal starts a foreground command: SIGINT at its default (Python then turns it
    into KeyboardInterrupt). A test session launched in the background by a non-interactive
    shell inherits SIGINT ignored, and so would ``sieve serve``: Ctrl-C would then be judged on
    a process that was told to ignore it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def serve_process(folder: Path) -> Iterator[Served]:
    """Start ``sieve serve`` in ``folder``; yield once its three deployments are registered."""
    config = folder / "serve.yaml"
    config.write_text(TINY_SERVE)
    store = Store(folder / "store")
    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(folder / "prefect-home")  # not the test session's local API
    log = folder / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--store", str(store.root), "-c",
             str(config), "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=_default_sigint)
    served = Served(store, f"http://127.0.0.1:{prefect_port}",
                    f"http://127.0.0.1:{mlflow_port}", process, log)
    try:
        _wait_for_deployments(served)
        yield served
    finally:
        _stop(served, (prefect_port, mlflow_port))


def _wait_for_deployments(served: Served) -> None:
    started = time.monotonic()
    while time.monotonic() - started < STARTUP_TIMEOUT_S:
        assert served.process.poll() is None, f"sieve serve exited: {served.tail()}"
        try:
            if len(served.api("deployments/filter", {})) == 3:
                print(f"sieve serve ready in {time.monotonic() - started:.1f} s")
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"sieve serve not ready in {STARTUP_TIMEOUT_S} s: {served.tail()}")


def _stop(served: Served, ports: tuple[int, int]) -> None:
    """Ctrl-C: ``sieve serve`` exits 0, its servers and flow runs are gone, the ports free."""
    children = psutil.Process(served.process.pid).children(recursive=True)
    served.process.send_signal(signal.SIGINT)
    try:
        code = served.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        served.process.kill()
        raise AssertionError(f"sieve serve ignored Ctrl-C for {STOP_TIMEOUT_S} s") from None
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    assert code == 0, served.tail()
    assert not alive, f"left running: {[p.pid for p in alive]}"
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
