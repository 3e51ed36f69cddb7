"""The servers behind ``sieve serve``: a Prefect server (API + UI) and an MLflow tracking server
(UI over the store's ``mlflow.db``), each a child process in its own process group, logging to
``<store>/serve/<name>.log``. ``running_servers`` starts both (``Servers.wait_healthy`` waits
until each answers its health check) and on exit stops them (SIGTERM to the group, SIGKILL after
a grace period)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from storage.errors import BadInput
from storage.store import Store

STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class Servers:
    """Where the started servers answer (the Prefect UI, its API, the MLflow UI), and a way to
    wait until they do."""

    prefect: str
    prefect_api: str
    mlflow: str
    children: tuple[_Child, ...]

    def wait_healthy(self) -> None:
        """Return once every server answers its health check; RuntimeError (with the log's
        tail) when one exits first or STARTUP_TIMEOUT_S passes."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for child in self.children:
            child.wait_healthy(deadline)


def check_port_free(host: str, port: int, flag: str) -> None:
    """BadInput naming ``flag`` when nothing can listen on ``host:port`` (bound as the servers
    bind: SO_REUSEADDR, so connections still closing from a previous serve don't count)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise BadInput(f"can't listen on {host}:{port} ({exc.strerror}); choose {flag}") from None


@contextmanager
def running_servers(store: Store, host: str, prefect_port: int,
                    mlflow_port: int) -> Iterator[Servers]:
    """Start the Prefect and MLflow servers (on free ports: see ``check_port_free``) and yield
    at once (they take seconds to answer: see ``Servers.wait_healthy``); stop them on exit."""
    logs = store.local_dir / "serve"
    logs.mkdir(parents=True, exist_ok=True)
    store.artifact_root.mkdir(parents=True, exist_ok=True)
    prefect = f"http://{host}:{prefect_port}"
    mlflow = f"http://{host}:{mlflow_port}"
    prefect_cmd = [sys.executable, "-P", "-m", "prefect", "server", "start",
                   "--host", host, "--port", str(prefect_port)]
    mlflow_cmd = [sys.executable, "-P", "-m", "mlflow", "server", "--host", host,
                  "--port", str(mlflow_port), "--workers", "1",
                  "--backend-store-uri", store.mlflow_uri,
                  "--artifacts-destination", str(store.artifact_root)]
    prefect_env = {  # the UI asks /ui-settings where the API is: here, not the default port
        "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(prefect_port),
        "PREFECT_SERVER_UI_API_URL": f"{prefect}/api",
        "PREFECT_SERVER_UI_V2_ENABLED": "false",  # the classic UI by default (link to the new)
    }
    mlflow_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    children: list[_Child] = []
    try:
        children.append(_start("prefect", prefect_cmd, prefect_env, logs, f"{prefect}/api/health"))
        children.append(_start("mlflow", mlflow_cmd, mlflow_env, logs, f"{mlflow}/health"))
        yield Servers(prefect, f"{prefect}/api", mlflow, tuple(children))
    finally:
        _stop(children)


@dataclass
class _Child:
    name: str
    process: subprocess.Popen
    log: Path
    health_url: str

    def wait_healthy(self, deadline: float) -> None:
        """Return when ``health_url`` answers 200; RuntimeError (with the log's tail) when the
        process exits first or ``deadline`` (monotonic seconds) passes."""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.name} server exited: {self._tail()}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the {self.name} server did not answer {self.health_url} in time: "
                           f"{self._tail()}")

    def _tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-5:]) + f" (log: {self.log})"


def _start(name: str, command: list[str], env: dict[str, str], logs: Path,
           health_url: str) -> _Child:
    log = logs / f"{name}.log"
    env = {**os.environ, **env}
    env.pop("PREFECT_API_URL", None)  # a server never talks to another one
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    return _Child(name, process, log, health_url)


def _stop(children: list[_Child]) -> None:
    """SIGTERM to every child's process group at once, SIGKILL to those (and any stray
    grandchildren) still there after STOP_GRACE_S."""
    for child in children:
        if child.process.poll() is None:
            _signal_group(child.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        with suppress(subprocess.TimeoutExpired):
            child.process.wait(max(0.0, deadline - time.monotonic()))
    for child in children:
        _signal_group(child.process.pid, signal.SIGKILL)
        child.process.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
