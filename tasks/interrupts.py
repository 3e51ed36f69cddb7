"""Interruptions: SIGTERM (what schedulers and Kubernetes send) and SIGINT (Ctrl-C) stop a run
by unwinding it, like an error, so every ``finally`` runs: a half-written file's temporary is
removed, the MLflow runs are closed as KILLED, the run is marked interrupted.

A signal handler raises in whatever the main thread is running; when that is a finalizer or a
weakref callback (garbage collection), Python prints the exception ("Exception ignored in ...")
and drops it, and the run would carry on as if no signal had come. ``signals_raise`` therefore
also records an interruption that Python dropped (``sys.unraisablehook``), and
``raise_swallowed`` (called as stages start and as they advance) raises it again."""

from __future__ import annotations

import gc
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_swallowed: list[int] = []
"""Signals whose exception Python dropped (raised in a finalizer or weakref callback)."""


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


def release_frames(error: BaseException) -> None:
    """Free what the frames an interruption cut short still hold, before anything is recorded
    about it. A signal that lands inside an MLflow write leaves its SQLAlchemy session, and the
    sqlite write lock with it, alive in the traceback's frames; ending a stage or the run as
    KILLED would then wait out sqlite's busy timeout (20 s) and fail. Clearing the finished
    frames' locals (in ``error`` and its cause/context chain; frames still running are left)
    and collecting returns the connection to its pool, which rolls the cut-short transaction
    back."""
    seen: set[int] = set()
    exc: BaseException | None = error
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()


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

    hook = sys.unraisablehook

    def unraisable(info: sys.UnraisableHookArgs) -> None:
        signum = interruption(info.exc_value)
        if signum is not None:
            _swallowed.append(signum)
        hook(info)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        sys.unraisablehook = hook
        _swallowed.clear()
        for sig, old in previous.items():
            signal.signal(sig, old)


def raise_swallowed() -> None:
    """Raise ``Interrupted`` for the first signal whose exception Python dropped (see the
    module docstring), once; a no-op when there is none or outside the main thread (a worker
    thread's exception would not unwind the run)."""
    if _swallowed and threading.current_thread() is threading.main_thread():
        signum = _swallowed[0]
        _swallowed.clear()
        raise Interrupted(signum)
