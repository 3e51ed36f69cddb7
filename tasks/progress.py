"""Progress of a long stage (training, gradients, scoring, retraining): counts, rate and ETA.

While ``live_bars`` is active in this process (``sieve run`` on an interactive terminal), each
stage is a rich progress bar drawn on Prefect's console, so log lines scroll above the bars.
Otherwise (a pipe, a Prefect worker, a Dask/Ray worker, tests) a stage logs plain lines,
``"<stage>: 12/40 shards, 230 shards/s, ETA 3 s"``, each time another tenth of it is done and at
least every 30 s. The last line (done == total) is logged either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.default_styles import DEFAULT_STYLES
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Column
from rich.text import Text
from rich.theme import Theme

from tasks.interrupts import raise_swallowed

Logger = logging.Logger | logging.LoggerAdapter
_LOG_EVERY_S = 30.0
_lock = threading.Lock()
_bars: Progress | None = None


def duration(seconds: float) -> str:
    """A short human duration: ``"<1 s"``, ``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``."""
    if seconds < 1:
        return "<1 s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class _Rate(ProgressColumn):
    """Units per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed and task.finished and task.finished_time:
            speed = task.completed / task.finished_time
        return Text(f"{speed:.3g}/s" if speed else "", style="progress.data.speed")


class _When(ProgressColumn):
    """``ETA <duration>`` while running, ``took <duration>`` once finished."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text(f"took {duration(task.finished_time or 0.0)}", style="progress.elapsed")
        left = task.time_remaining
        return Text(f"ETA {duration(left) if left is not None else '?'}",
                    style="progress.remaining")


class _Note(ProgressColumn):
    """What just finished; the column a narrow terminal shortens first (never wraps)."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=False, overflow="ellipsis"))

    def render(self, task: Task) -> Text:
        return Text(task.fields.get("note", ""), no_wrap=True, overflow="ellipsis")


@contextmanager
def live_bars(console: Console) -> Iterator[None]:
    """Draw every stage's progress as a bar on ``console`` while the block runs (one display per
    process; the bars stay on screen when it ends)."""
    global _bars
    bars = Progress(
        TextColumn("{task.description:<11}"), BarColumn(bar_width=20),
        TextColumn("{task.completed:.0f}/{task.total:.0f} {task.fields[unit]}",
                   style="progress.download"),
        _Rate(), _When(),
        _Note(),
        console=console,
    )
    # Prefect's console has a theme without rich's defaults; lend it the progress styles.
    console.push_theme(Theme({k: v for k, v in DEFAULT_STYLES.items()
                              if k.startswith(("bar.", "progress."))}))
    try:
        with bars:
            with _lock:
                _bars = bars
            try:
                yield
            finally:
                with _lock:
                    _bars = None
    finally:
        console.pop_theme()


class StageProgress:
    """``total`` units of work in stage ``stage``; call ``advance`` as units complete (from any
    thread). ``note`` says what just finished (shown on the bar or appended to the line)."""

    def __init__(self, stage: str, total: int, unit: str, log: Logger) -> None:
        self.stage, self.total, self.unit, self.log = stage, total, unit, log
        self.done = 0
        self.started = time.perf_counter()
        self._logged_tenth = 0
        self._logged_at = self.started
        with _lock:
            self._bars = _bars
        self._bar = (self._bars.add_task(stage, total=total, unit=unit, note="")
                     if self._bars is not None and total > 0 else None)

    def advance(self, n: int = 1, note: str = "") -> None:
        raise_swallowed()  # a signal that arrived during garbage collection stops the run here
        with _lock:
            self.done += n
            done = self.done
            now = time.perf_counter()
            tenth = 10 * done // max(1, self.total)
            due = done >= self.total or (self._bar is None and (
                tenth > self._logged_tenth or now - self._logged_at >= _LOG_EVERY_S))
            if due:
                self._logged_tenth, self._logged_at = tenth, now
        if self._bar is not None:
            self._bars.update(self._bar, advance=n, note=note)
        if due:
            self.log.info("%s", self.line(done, now - self.started, note))

    def line(self, done: int, elapsed: float, note: str = "") -> str:
        """``"<stage>: <done>/<total> <unit>, <rate> <unit>/s, ETA <t>[ (<note>)]"``; the last
        line says the elapsed time instead of the ETA."""
        rate = done / elapsed if elapsed > 0 else 0.0
        if done >= self.total:
            when = f"done in {duration(elapsed)}"
        else:
            when = f"ETA {duration((self.total - done) / rate)}" if rate > 0 else "ETA unknown"
        text = f"{self.stage}: {done}/{self.total} {self.unit}, {rate:.3g} {self.unit}/s, {when}"
        return f"{text} ({note})" if note else text
