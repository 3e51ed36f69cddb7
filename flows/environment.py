"""Process environment for Prefect and MLflow, set before either is imported."""

from __future__ import annotations

import os
from pathlib import Path

from storage.locks import file_lock

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GIT_PYTHON_REFRESH": "quiet",
}


def configure(local_dir: Path) -> None:
    """Embedded defaults: Prefect's local API with its home in the store's local folder
    (``Store.local_dir``; unless the user points PREFECT_HOME / PREFECT_API_URL elsewhere),
    telemetry off."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(local_dir / ".prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


def start_local_api() -> None:
    """Start Prefect's temporary local API now (unless an API URL is set); it lives until the
    process exits and later flow calls reuse it.

    The first start on a PREFECT_HOME creates its sqlite database; concurrent first starts
    would migrate it at once, so that one is done under a lock and then marked done
    (``.sieve-api-ready``). Later starts, concurrent or not, need no lock.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    home = Path(os.environ["PREFECT_HOME"])
    ready = home / ".sieve-api-ready"
    if not ready.exists():
        with file_lock(home / ".sieve-api-start.lock"):
            if not ready.exists():
                _healthcheck()
                ready.touch()
                return
    _healthcheck()


def _healthcheck() -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise RuntimeError(f"Prefect's local API did not start: {error}")
