"""A signal whose exception Python drops (it arrived while a finalizer ran) still stops the run:
``signals_raise`` records it and the next stage step raises it."""

from __future__ import annotations

import logging
import os
import signal

import pytest
from prefect.utilities.engine import _prefect_sigterm_handler

from tasks.interrupts import Interrupted, raise_swallowed, signals_raise
from tasks.progress import StageProgress

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class _SignalledWhileCollected:
    """Sends ``signum`` to this process from its finalizer, so the handler runs (and raises)
    inside ``__del__``, where Python prints the exception and drops it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)
        for _ in range(1000):  # bytecodes for the pending handler to run on
            pass


def _collect_while_signalled(signum: int) -> None:
    obj = _SignalledWhileCollected(signum)
    del obj


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_dropped_in_a_finalizer_is_raised_at_the_next_step(signum) -> None:
    progress = StageProgress("train", 3, "epochs", logging.getLogger("test"))
    with signals_raise():
        _collect_while_signalled(signum)  # the Interrupted is printed and dropped here
        with pytest.raises(Interrupted) as caught:
            progress.advance()
        assert caught.value.signum == signum
        raise_swallowed()  # once: the run is already unwinding
    raise_swallowed()


def test_prefects_termination_signal_dropped_in_a_finalizer_is_raised_too() -> None:
    """Inside a flow Prefect's own SIGTERM handler raises TerminationSignal; dropped, the same."""
    with signals_raise():
        previous = signal.signal(signal.SIGTERM, _prefect_sigterm_handler)
        try:
            _collect_while_signalled(signal.SIGTERM)
        finally:
            signal.signal(signal.SIGTERM, previous)
        with pytest.raises(Interrupted) as caught:
            raise_swallowed()
        assert caught.value.signum == signal.SIGTERM


def test_nothing_dropped_nothing_raised() -> None:
    progress = StageProgress("train", 2, "epochs", logging.getLogger("test"))
    with signals_raise():
        progress.advance()
        raise_swallowed()
