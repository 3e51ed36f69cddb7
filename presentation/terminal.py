"""What the terminal shows while a CLI command runs a flow: progress bars on an interactive
terminal, plain log lines when output is piped, only errors with ``--quiet`` / ``--json``."""

from __future__ import annotations

import atexit
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from prefect.logging.handlers import PrefectConsoleHandler
from rich.console import Console


def _stream_handlers() -> list[logging.Handler]:
    """Every handler that writes log records to a stream (console), on any logger."""
    loggers = [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    handlers = {id(h): h for logger in loggers for h in logger.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)}
    return list(handlers.values())


@contextmanager
def errors_only() -> Iterator[None]:
    """While the block runs, and again at interpreter exit, console log handlers (Prefect's,
    MLflow's, ...) show only errors; Python warnings become log records (so they are hidden
    too). Records still reach non-console handlers, e.g. Prefect's API, so the Prefect UI keeps
    the run's logs."""
    handlers = _stream_handlers()
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(max(h.level, logging.ERROR))
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for h, level in zip(handlers, levels, strict=True):
            h.setLevel(level)
        # Prefect stops its temporary server at exit and logs that; registered after Prefect's
        # own hook, this one runs first and keeps those last lines off the console too.
        atexit.register(_errors_only_at_exit, handlers)


def _errors_only_at_exit(handlers: list[logging.Handler]) -> None:
    for h in handlers:
        h.setLevel(max(h.level, logging.ERROR))


def _prefect_console() -> PrefectConsoleHandler | None:
    return next((h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)),
                None)


def flow_output(quiet: bool, bars: Callable[[Console], AbstractContextManager[None]]):
    """A context for running a flow from the CLI. ``quiet``: errors only. Otherwise progress
    bars (``bars(console)``, drawn on Prefect's console, so its log lines scroll above them)
    when stdout and Prefect's console are both terminals; plain progress log lines when not."""
    if quiet:
        return errors_only()
    console = _prefect_console()
    if console is not None and sys.stdout.isatty() and console.console.is_terminal:
        return bars(console.console)
    return nullcontext()
