"""Stage progress: plain log lines with counts, rate and ETA (about one per tenth of the work),
or a live bar on a terminal console with only the last line logged."""

from __future__ import annotations

import io
import logging
import re

from rich.console import Console

from tasks.progress import StageProgress, duration, live_bars


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _logger(name: str) -> tuple[logging.Logger, _Lines]:
    log = logging.getLogger(f"sieve-test.{name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    lines = _Lines()
    log.handlers = [lines]
    return log, lines


def test_plain_lines_say_counts_rate_and_eta_about_once_per_tenth():
    log, out = _logger("plain")
    shards = StageProgress("gradients", 100, "samples", log)
    for i in range(1, 101):
        shards.advance(note=f"{i}/100 shards")
    assert 10 <= len(out.lines) <= 11, out.lines
    first = re.fullmatch(r"gradients: (\d+)/100 samples, ([\d.e+]+) samples/s, ETA (.+) "
                         r"\((\d+)/100 shards\)", out.lines[0])
    assert first and first.group(1) == first.group(4) and float(first.group(2)) > 0
    assert re.fullmatch(r"gradients: 100/100 samples, [\d.e+]+ samples/s, done in .+ "
                        r"\(100/100 shards\)", out.lines[-1]), out.lines[-1]
    counts = [int(line.split()[1].split("/")[0]) for line in out.lines]
    assert counts == sorted(counts) and counts[-1] == 100


def test_a_live_bar_draws_counts_and_logs_only_the_last_line():
    log, out = _logger("bar")
    screen = io.StringIO()
    console = Console(file=screen, width=120, force_terminal=True, color_system=None)
    with live_bars(console):
        retrains = StageProgress("retrain", 30, "retrains", log)
        for _ in range(30):
            retrains.advance(note="full, seed 0")
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "30/30 retrains" in drawn and "full, seed 0" in drawn
    assert len(out.lines) == 1 and out.lines[0].startswith("retrain: 30/30 retrains")


def test_durations_read_as_a_person_would_say_them():
    assert [duration(s) for s in (0.2, 42, 185, 7620)] == ["<1 s", "42 s", "3 min 05 s",
                                                          "2 h 07 min"]
