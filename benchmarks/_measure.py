"""Timing and resident-memory helpers shared by the benchmark sections (Linux /proc based).

torch allocates outside Python's allocator, so tracemalloc does not see it; the kernel's view
(VmRSS, and VmHWM, the peak, which ``/proc/self/clear_refs`` resets) does.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    """Resident set size now, MiB (None where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> float | None:
    """Peak resident set size since the process start or the last ``reset_peak``, MiB."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory(collect: bool = True) -> None:
    """Hand freed heap back to the OS, so the next measurement starts low; ``collect`` first
    runs the cyclic garbage collector (~0.15 s with torch and the peers imported)."""
    if collect:
        gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(ImportError):
        import pyarrow

        pyarrow.default_memory_pool().release_unused()


@dataclass
class Measured:
    """Wall and CPU seconds of each timed pass, and the largest peak-RSS growth of a pass above
    the RSS just before it (MiB)."""

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_delta_mib: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_per_wall(self) -> float:
        """Process CPU time over wall time of the timed passes: about 1 for a single-threaded
        run that had a core to itself, lower when other processes took the CPU."""
        return sum(self.cpu_seconds) / sum(self.seconds)

    def time_pass(self, fn: Callable[[], object]) -> None:
        release_memory(collect=False)  # the previous pass's output is freed by refcount
        reset_peak()
        start = rss_mib()
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        self.cpu_seconds.append(time.process_time() - cpu)
        self.seconds.append(time.perf_counter() - wall)
        del out
        peak = peak_rss_mib()
        if start is not None and peak is not None:
            self.peak_delta_mib = max(self.peak_delta_mib or 0.0, peak - start)


def measure_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int
) -> dict[str, Measured | BaseException]:
    """Time already warmed-up callables round-robin (pass 1 of each, then pass 2 of each...),
    so load from other processes that drifts over time hits every method alike. A callable
    that raises is dropped from later rounds and its exception returned instead."""
    results: dict[str, Measured | BaseException] = {name: Measured() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            record = results[name]
            if isinstance(record, Measured):
                try:
                    record.time_pass(fn)
                except Exception as exc:  # noqa: BLE001 - reported as the method's failure
                    results[name] = exc
    return results


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters)."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on {os.cpu_count()} CPUs"
