"""Where the memory of a ``sieve run`` goes: RSS of the CLI process sampled every 10 ms while
it runs the flow in-process, attributed to the Prefect task that was running (from Prefect's
"Beginning"/"Finished" log lines), plus the RSS after the imports alone and the temporary
Prefect server's RSS (a child process, not in the CLI's figure).

    .venv/bin/python -m benchmarks.memory                      # the embedded default
    .venv/bin/python -m benchmarks.memory --set estimators=[ip,tracin] --set prune.seeds=1

Prints one table: phase, peak RSS (MiB) in it, RSS when it started. Timings are under whatever
load the machine has; RSS is not.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import threading
import time

import psutil

_MIB = 2**20
_TASK = re.compile(r"Task run '([^']+)'")


class _Phases(logging.Handler):
    """Start and end times of every Prefect task run, by name (suffix stripped)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[float, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        name = getattr(record, "task_run_name", None)
        if name is None:
            match = _TASK.search(message)
            name = match.group(1) if match else None
        if name is None:
            return
        phase = name.rsplit("-", 1)[0]
        if "Finished in state" in message:
            self.events.append((time.monotonic(), phase, "end"))
        elif not any(e[1] == phase and e[2] == "start" for e in self.events[-50:]):
            self.events.append((time.monotonic(), phase, "start"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    me = psutil.Process()
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            children = sum(c.memory_info().rss for c in me.children(recursive=True)
                           if c.is_running())
            samples.append((time.monotonic(), me.memory_info().rss, children))
            done.wait(0.01)

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # loaded CPUs
    before = me.memory_info().rss
    import flows.evaluate  # noqa: F401  (what `run` imports)
    import flows.pipeline  # noqa: F401
    import tasks.train  # noqa: F401
    from flows.cli import main as sieve

    imported = me.memory_info().rss
    phases = _Phases()
    logging.getLogger().addHandler(phases)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as store:
        argv = ["run", "--store", store, "--quiet"]
        for item in args.set:
            argv += ["--set", item]
        code = sieve(argv)
    done.set()
    thread.join()
    rows = [("python + imports", imported / _MIB, before / _MIB)]
    opened: dict[str, float] = {}
    spans: list[tuple[str, float, float]] = []
    for t, phase, kind in phases.events:
        if kind == "start":
            opened.setdefault(phase, t)
        elif phase in opened:
            spans.append((phase, opened.pop(phase), t))
    merged: dict[str, tuple[float, float]] = {}
    for phase, t0, t1 in spans:
        lo, hi = merged.get(phase, (t0, t1))
        merged[phase] = (min(lo, t0), max(hi, t1))
    for phase, (t0, t1) in sorted(merged.items(), key=lambda kv: kv[1][0]):
        inside = ([s for s in samples if t0 <= s[0] <= t1]
                  or [min(samples, key=lambda s: abs(s[0] - t0))])
        rows.append((phase, max(s[1] for s in inside) / _MIB, inside[0][1] / _MIB))
    peak = max(samples, key=lambda s: s[1])
    server = max(s[2] for s in samples)
    print(f"sieve run exit {code}, {time.monotonic() - started:.0f} s (pid {os.getpid()})")
    print(f"{'phase':<28}{'peak RSS MiB':>14}{'at start MiB':>14}")
    for phase, high, low in rows:
        print(f"{phase:<28}{high:>14.0f}{low:>14.0f}")
    print(f"{'whole run (CLI process)':<28}{peak[1] / _MIB:>14.0f}")
    print(f"{'child processes (server)':<28}{server / _MIB:>14.0f}")
    return code


if __name__ == "__main__":
    sys.exit(main())
