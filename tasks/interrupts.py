"""Interruptions: SIGTERM (what schedulers and Kubernetes send) and SIGINT (Ctrl-C) stop a run
by unwinding it, like an error, so every ``finally`` runs: a half-written file's temporary is
removed, the MLflow runs are closed as KILLED, the run is marked interrupted."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The process received ``signum`` (a BaseException: ``except Exception`` lets it pass)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def interruption(exc: BaseException | None) -> int | None:
    """The signal number when ``exc``, or an error raised while handling one (its cause or
    context chain), is an interruption: ``Interrupted``, KeyboardInterrupt (SIGINT), or
    Prefect's TerminationSignal (Prefect turns SIGTERM into it inside a flow)."""
    from prefect.exceptions import TerminationSignal

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Interrupted):
            return exc.signum
        if isinstance(exc, KeyboardInterrupt):
            return signal.SIGINT
        if isinstance(exc, TerminationSignal):
            return exc.signal
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, the first SIGTERM or SIGINT raises ``Interrupted`` in the main thread;
    later ones are ignored while the run unwinds (a second Ctrl-C must not cut the clean-up
    short). The previous handlers are restored on exit. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
