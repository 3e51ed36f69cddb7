"""Peak resident memory of a block of work, sampled from /proc (Linux) by a thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size now (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


@dataclass
class PeakMemory:
    start: int = 0
    peak: int = 0

    @property
    def delta_mb(self) -> float:
        """Peak RSS during the block above the RSS when it started, in MiB."""
        return max(0, self.peak - self.start) / 2**20


@contextmanager
def peak_memory(interval: float = 0.005) -> Iterator[PeakMemory]:
    """Sample RSS every ``interval`` seconds while the block runs (process-wide: concurrent
    work in other threads counts too)."""
    record = PeakMemory(start=rss_bytes())
    record.peak = record.start
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            record.peak = max(record.peak, rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        done.set()
        thread.join()
        record.peak = max(record.peak, rss_bytes())
