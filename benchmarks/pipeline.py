"""Section 2: stage times and peak memory of Sieve's own pipeline pieces on the default
workload (digits, MLP, 20 % flipped labels), each stage in a fresh process
(``benchmarks.stages``), no Prefect, no MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from estimators.registry import ESTIMATORS

ROOT = Path(__file__).resolve().parents[1]
QUICK_OVERRIDES = ["train.epochs=3", "train.checkpoints=2"]
QUICK_ESTIMATORS = ["random", "loss", "ip", "tracin"]


def _run(stage: str, run_dir: Path, opts: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.stages", stage, str(run_dir), json.dumps(opts)],
        cwd=ROOT, capture_output=True, text=True,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"stage": stage, "failed": f"worker exited {proc.returncode}: {tail[:160]}"}


def run_section(quick: bool) -> dict:
    overrides = QUICK_OVERRIDES if quick else []
    names = QUICK_ESTIMATORS if quick else list(ESTIMATORS)
    opts = {"overrides": overrides}
    with tempfile.TemporaryDirectory(prefix="sieve-bench-run-") as tmp:
        run_dir = Path(tmp) / "run"
        stages = [_run(s, run_dir, opts) for s in ("data", "train", "gradients")]
        scores = [_run(f"score:{name}", run_dir, opts) for name in names]
        stages.append(_run("query", run_dir, opts))
    _ratios(stages, scores)
    return {
        "info": {"overrides": overrides or ["(none: the embedded default config)"],
                 "estimators": names},
        "stages": stages,
        "scores": scores,
    }


def _ratios(stages: list[dict], scores: list[dict]) -> None:
    scoring = sum(s.get("seconds", 0.0) for s in scores)
    total = sum(s.get("seconds", 0.0) for s in stages) + scoring
    for row in stages + scores:
        if "seconds" in row and total > 0:
            row["share_of_total"] = row["seconds"] / total
        if "seconds" in row and row.get("rss_start_mib") is not None:
            row["peak_delta_mib"] = max(0.0, row["peak_rss_mib"] - row["rss_start_mib"])
        if row.get("samples") and row.get("seconds"):
            row["samples_per_s"] = row["samples"] / row["seconds"]
        if row.get("seconds") and "cpu_seconds" in row:
            row["cpu_per_wall"] = row["cpu_seconds"] / row["seconds"]
    tracin = next((s for s in scores if s["stage"] == "score:tracin" and "seconds" in s), None)
    for row in scores:
        if tracin is not None and "seconds" in row:
            row["ratio_tracin"] = row["seconds"] / tracin["seconds"]
    # the whole scoring stage as one row between gradients and query
    ok = [s for s in scores if "seconds" in s]
    stages.insert(3, {
        "stage": f"score ({len(ok)}/{len(scores)} estimators, sum)",
        "seconds": scoring,
        "cpu_per_wall": sum(s["cpu_seconds"] for s in ok) / scoring if scoring else None,
        "share_of_total": scoring / total if total else None,
        "peak_rss_mib": max((s["peak_rss_mib"] for s in ok), default=None),
        "peak_delta_mib": max((s["peak_delta_mib"] for s in ok), default=None),
    })
    for row in stages:
        if "seconds" in row and total > 0:
            row["total_seconds"] = total
