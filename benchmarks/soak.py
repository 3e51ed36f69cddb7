"""Soak test: many consecutive tiny ``sieve run``s in ONE process (``flows.cli.main``), measuring
after each run the process's open file descriptors, threads and resident memory.

A leak shows as growth from run to run: the acceptance is no growth in open file handles and
under 10 % RSS growth from the first run to the last (the first run pays the imports and the
Prefect server start, so it is the baseline).

    .venv/bin/python -m benchmarks.soak                  # 20 runs in a temporary store
    .venv/bin/python -m benchmarks.soak --runs 5 --json soak.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.tiny import run_args, write_data


def measure() -> dict[str, float]:
    """This process now: open fds, threads, RSS (MiB), after a garbage collection."""
    gc.collect()
    proc = psutil.Process()
    return {"fds": proc.num_fds(), "threads": proc.num_threads(),
            "rss_mib": proc.memory_info().rss / 2**20}


def soak(runs: int, store: Path) -> list[dict[str, float]]:
    """``runs`` tiny runs one after another in ``store``; one measurement per run."""
    from flows.cli import main

    data = write_data(store.parent / "tiny.parquet")
    rows = []
    for i in range(1, runs + 1):
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the run's summary table
            code = main([*run_args(store, data, seed=i), "--quiet"])
        if code != 0:
            raise SystemExit(f"run {i} exited with {code}")
        rows.append({"run": i, "seconds": time.perf_counter() - started, **measure()})
        r = rows[-1]
        print(f"run {i:2d}/{runs}: {r['seconds']:5.1f} s, {r['fds']} fds, {r['threads']} threads,"
              f" RSS {r['rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    first, last = rows[0], rows[-1]
    return {
        "runs": len(rows),
        "fds_first": first["fds"], "fds_last": last["fds"],
        "fds_max": max(r["fds"] for r in rows),
        "threads_first": first["threads"], "threads_last": last["threads"],
        "rss_first_mib": first["rss_mib"], "rss_last_mib": last["rss_mib"],
        "rss_growth_pct": 100 * (last["rss_mib"] / first["rss_mib"] - 1),
        "seconds_median": sorted(r["seconds"] for r in rows)[len(rows) // 2],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sieve-soak-") as tmp:
        rows = soak(args.runs, Path(tmp) / "store")
    result = summary(rows)
    print("\n".join(f"{k:>15}: {v:.1f}" if isinstance(v, float) else f"{k:>15}: {v}"
                    for k, v in result.items()))
    if args.json:
        args.json.write_text(json.dumps({"summary": result, "runs": rows}, indent=1))
    ok = result["fds_last"] <= result["fds_first"] and result["rss_growth_pct"] < 10
    print("PASS" if ok else "FAIL: open files grew or RSS grew by 10 % or more")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
