"""The task runner flows fan out on."""

from __future__ import annotations

import os

from prefect.task_runners import ThreadPoolTaskRunner


def thread_workers() -> int:
    """Concurrent tasks: a couple more than the cores (torch runs one thread per task).
    Prefect's own default is unbounded, which runs hundreds of retrains at once."""
    return (os.cpu_count() or 1) + 2


def task_runner() -> ThreadPoolTaskRunner:
    return ThreadPoolTaskRunner(max_workers=thread_workers())
