"""``sieve serve``: a Prefect server and an MLflow UI (by default on 127.0.0.1), and this process
serving the deployments of Sieve's flows (flows/deployments.py) on the cron schedules of the
config's ``serve.schedules``. Ctrl-C (SIGINT) or SIGTERM stops the deployments, then both
servers. Runs triggered from the UI land in this store, like ``sieve run --store``."""

from __future__ import annotations

import os
import signal
import warnings
from typing import TYPE_CHECKING, Any

from flows.environment import configure
from storage.errors import BadInput
from storage.store import Store

if TYPE_CHECKING:
    from flows.servers import Servers

RUNNER_POLL_S = 5  # how often the runner asks the server for runs that are due


def serve(store: Store, config_path: str | None, overrides: list[str],
          host: str | None = None, prefect_port: int | None = None,
          mlflow_port: int | None = None) -> int:
    """Serve until interrupted; ``host`` and the ports, when given, replace ``serve.*``.
    Bad input raises BadInput: the config, cron strings and ports before anything starts; the
    deployments (built while the servers boot) before anything is served."""
    configure(store.local_dir)
    from tasks.config import load_config

    config = load_config(config_path, overrides)
    settings = config.serve
    host = host or settings.host
    prefect_port = prefect_port or settings.prefect_port
    mlflow_port = mlflow_port or settings.mlflow_port
    _check_crons(settings.schedules)
    from flows.servers import check_port_free, running_servers

    check_port_free(host, prefect_port, "another --prefect-port")
    check_port_free(host, mlflow_port, "another --mlflow-port")
    path = os.path.abspath(config_path) if config_path else None

    previous = signal.signal(signal.SIGTERM, _interrupt)  # the runner installs its own,
    # which exits (code 0) after calling an async stop() without awaiting it: harmless, but noisy
    warnings.filterwarnings("ignore", message="coroutine 'Runner.astop' was never awaited")
    try:
        with running_servers(store, host, prefect_port, mlflow_port) as servers:
            from flows.deployments import ENTRY_FLOWS, deployments

            unknown = sorted(set(settings.schedules) - set(ENTRY_FLOWS))
            if unknown:
                raise BadInput(f"serve.schedules: no deployment {', '.join(unknown)}; known: "
                               f"{', '.join(ENTRY_FLOWS)}")
            served = deployments(path, overrides, settings.schedules)
            servers.wait_healthy()
            _serve(served, servers, store)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("sieve serve: stopped", flush=True)
    return 0


def _serve(served: list, servers: Servers, store: Store) -> None:
    from prefect import serve as serve_deployments
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = servers.prefect_api  # for the flow-run subprocesses,
    os.environ["SIEVE_STORE"] = str(store.root)  # and where their runs go
    with temporary_settings(updates={PREFECT_API_URL: servers.prefect_api}):
        print(f"Prefect UI {servers.prefect}  MLflow UI {servers.mlflow}  store {store.root}\n"
              f"server logs in {store.local_dir / 'serve'}; Ctrl-C stops everything", flush=True)
        serve_deployments(*served, pause_on_shutdown=False, query_seconds=RUNNER_POLL_S)


def _check_crons(schedules: dict[str, str]) -> None:
    """BadInput for a schedule holding an invalid cron string."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    for name, cron in schedules.items():
        try:
            CronSchedule(cron=cron)
        except ValidationError:
            raise BadInput(f"serve.schedules.{name}: {cron!r} is not a valid cron string") \
                from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
