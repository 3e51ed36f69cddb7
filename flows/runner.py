"""The task runner flows fan out on: threads (default), a Dask cluster or a Ray cluster.

``runner: threads`` runs tasks on a thread pool in this process. ``runner: dask`` starts a
``LocalCluster`` of ``dask.workers`` worker processes (one per visible GPU when there are GPUs),
or connects to the scheduler at ``dask.address``. ``runner: ray`` starts Ray locally or joins
``ray.address`` (needs the ``ray`` extra). Worker processes report their task runs to this
process's Prefect API: the temporary local server is started first and its URL handed to them.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import Flow
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from storage.errors import BadInput
from tasks.config import Config


def thread_workers() -> int:
    """Concurrent tasks: a couple more than the cores (torch runs one thread per task).
    Prefect's own default is unbounded, which runs hundreds of retrains at once."""
    return (os.cpu_count() or 1) + 2


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def task_runner(config: Config | None = None) -> TaskRunner:
    """The runner ``config.runner`` names (threads when no config is given)."""
    if config is None or config.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=thread_workers())
    if config.runner == "dask":
        return dask_runner(config)
    return ray_runner(config)


def with_runner(flow: Flow, config: Config) -> Flow:
    """``flow`` set to run its tasks on the runner ``config`` chooses."""
    if config.runner == "threads":
        return flow
    return flow.with_options(task_runner=task_runner(config))


def worker_environment() -> dict[str, str]:
    """Environment for worker processes: this process's Prefect API (the temporary local
    server is started now when no PREFECT_API_URL is set, so workers don't start their own)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    return {"PREFECT_API_URL": url, "OMP_NUM_THREADS": "1"}


ALLOWED_FAILURES = 3
"""A Dask task whose worker died is rescheduled on another worker; after this many such deaths
Dask gives up on it (``KilledWorker``). Set for a ``LocalCluster`` (its scheduler runs in this
process); a remote scheduler uses its own ``distributed.scheduler.allowed-failures``."""


def dask_runner(config: Config) -> TaskRunner:
    import dask
    from prefect_dask import DaskTaskRunner

    if config.dask.address:
        return DaskTaskRunner(address=config.dask.address)
    workers = gpu_count() or config.dask.workers
    dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES})
    kwargs: dict[str, Any] = {
        "n_workers": workers, "threads_per_worker": 1, "processes": True,
        "dashboard_address": None, "env": worker_environment(),
    }
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def ray_runner(config: Config) -> TaskRunner:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise BadInput("runner: ray needs the ray extra: pip install -e '.[ray]'") from None
    if config.ray.address:
        return RayTaskRunner(address=config.ray.address)
    init: dict[str, Any] = {"num_cpus": os.cpu_count() or 1, "num_gpus": gpu_count(),
                            "include_dashboard": False,
                            "runtime_env": {"env_vars": worker_environment()}}
    return RayTaskRunner(init_kwargs=init)
