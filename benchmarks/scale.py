"""``python -m benchmarks.scale [--n 1000000] [--k 1024] [--targets 1000] [--dir DIR] [--json P]``

Streaming scoring at scale, on one machine:

1. write a run: the synthetic workload's samples.parquet (n rows, ``workloads.synthetic``) and
   n x k gradient shards in the store's format (seeded random float32 rows standing in for
   projected gradients: scoring costs the same whatever the values; computing a million real
   projected gradients is the gradient stage's job, measured in ``benchmarks.speed``);
2. in a fresh process: the machine's float32 matmul rate (best of a few GEMM shapes, measured
   before and after the scoring, the same torch threads), then stream every shard block by
   block (``iter_gradient_blocks``, zero-copy views of Arrow's buffers, checksum not
   verified) through ``estimators.blockwise.stream_scores`` against T target rows, writing each
   shard's scores (summed over targets, and the worst target) as it goes; prints the scoring
   FLOP rate against the matmul rate, per wall second and per CPU second (the latter holds
   up when other processes share the cores), and the process's peak RSS;
3. DuckDB: the 100 most harmful of the n scores joined with samples (``storage.views``), cold
   (first query on a fresh connection) and warm (median of 5).

Every number is measured in this run. The run folder is deleted afterwards unless --dir is given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from benchmarks._measure import load_average, peak_rss_mib, reset_peak, rss_mib
from storage.atomic import write_parquet_atomic
from storage.gradient_shards import (
    ShardMeta,
    complete_shards,
    iter_gradient_blocks,
    write_gradient_shard,
)
from storage.store import RunPaths, Store

RUN_ID = "scale"
ESTIMATOR, TARGET = "stream_ip", "test_rows"
HARMFUL_SQL = (
    "SELECT s.sample_id, s.score, s.worst_target, m.split, m.label "
    "FROM scores s JOIN samples m USING (sample_id) ORDER BY s.score ASC LIMIT 100"
)


def write_run(run: RunPaths, n: int, k: int, shard_rows: int, seed: int) -> dict:
    """samples.parquet and the gradient shards (train split, checkpoint 0); returns timings."""
    from workloads.datasets import samples_table
    from workloads.synthetic import SyntheticSpec, load_synthetic

    started = time.perf_counter()
    samples = load_synthetic(SyntheticSpec(n, input_dim=16, classes=10, seed=seed),
                             {"train": 0.98, "val": 0.01, "test": 0.01})
    write_parquet_atomic(samples_table(samples), run.samples)
    samples_s = time.perf_counter() - started
    del samples
    directory = run.gradients_dir(0, "train")
    meta = ShardMeta(dtype="float32", projection="synthetic-random", k=k, seed=seed,
                     parameter_order=["synthetic"], parameter_count=k, checkpoint=0,
                     model_hash="synthetic", split="train")
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for part, start in enumerate(range(0, n, shard_rows)):
        stop = min(start + shard_rows, n)
        grads = torch.randn(stop - start, k, generator=generator)
        write_gradient_shard(directory / f"part-{part}.parquet",
                             np.arange(start, stop, dtype=np.int64), grads, meta)
    return {"samples_write_s": samples_s, "shards_write_s": time.perf_counter() - started,
            "shard_bytes": sum(p.stat().st_size for p in complete_shards(directory))}


def matmul_rate(k: int, targets: int, block: int, repeats: int = 5) -> dict:
    """The float32 GEMM rate over a few shapes, best of ``repeats`` each: FLOP per wall second
    (``best``) and per CPU second of this process (``best_cpu``, all threads counted; it holds
    up when other processes share the cores)."""
    shapes = {"scoring block": (block, k, targets), "square 2048": (2048, 2048, 2048)}
    rates, cpu_rates = {}, {}
    for name, (m, kk, t) in shapes.items():
        a, b = torch.randn(m, kk), torch.randn(kk, t)
        a @ b
        walls, cpus = [], []
        for _ in range(repeats):
            started, cpu = time.perf_counter(), time.process_time()
            a @ b
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu)
        rates[name] = 2 * m * kk * t / min(walls)
        cpu_rates[name] = 2 * m * kk * t / max(min(cpus), 1e-9)
    return {"rates": rates, "cpu_rates": cpu_rates, "best": max(rates.values()),
            "best_cpu": max(cpu_rates.values())}


def score_run(run: RunPaths, targets: int, seed: int) -> dict:
    """Stream every shard against ``targets`` rows; write each shard's scores as it goes."""
    from estimators.blockwise import stream_scores

    shards = complete_shards(run.gradients_dir(0, "train"))
    k = next(iter_gradient_blocks(shards[0]))[1].shape[1]
    before = matmul_rate(k, targets, block=8192)
    target_rows = torch.randn(targets, k, generator=torch.Generator().manual_seed(seed + 1))
    out = run.scores_dir(ESTIMATOR, TARGET)
    reset_peak()
    rss_start = rss_mib()
    started, cpu = time.perf_counter(), time.process_time()
    rows = 0
    for part, path in enumerate(shards):
        # the figures in docs/scaling.md are without the checksum (reliability.md: its cost)
        summary = stream_scores(iter_gradient_blocks(path, verify=False), target_rows)
        rows += len(summary.sample_ids)
        write_parquet_atomic(pa.table({
            "sample_id": pa.array(summary.sample_ids, pa.int64()),
            "score": pa.array(summary.summed, pa.float64()),
            "worst": pa.array(summary.worst.astype(np.float64), pa.float64()),
            "worst_target": pa.array(summary.worst_target, pa.int64()),
        }), out / f"part-{part}.parquet")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak = peak_rss_mib()
    after = matmul_rate(k, targets, block=8192)
    rate = max(before, after, key=lambda r: r["best"])
    best_cpu = max(before["best_cpu"], after["best_cpu"])
    flops = 2 * rows * k * targets / seconds
    flops_cpu = 2 * rows * k * targets / cpu
    return {"rows": rows, "k": k, "targets": targets, "shards": len(shards),
            "seconds": seconds, "flop_per_s": flops, "matmul": rate,
            "matmul_best_before_after": [before["best"], after["best"]],
            "fraction_of_matmul": flops / rate["best"], "flop_per_cpu_s": flops_cpu,
            "matmul_best_per_cpu_s": best_cpu, "fraction_of_matmul_cpu": flops_cpu / best_cpu,
            "rss_start_mib": rss_start,
            "peak_rss_mib": peak, "torch_threads": torch.get_num_threads(),
            "cpu_per_wall_per_thread": cpu / seconds / torch.get_num_threads()}


def query_run(run: RunPaths) -> dict:
    from storage.views import open_run, run_query

    started = time.perf_counter()
    with open_run(run) as con:
        _, rows = run_query(con, HARMFUL_SQL)
        cold = time.perf_counter() - started
        warm = []
        for _ in range(5):
            started = time.perf_counter()
            run_query(con, HARMFUL_SQL)
            warm.append(time.perf_counter() - started)
        [(total,)] = run_query(con, "SELECT count(*) FROM scores")[1]
    return {"sql": HARMFUL_SQL, "rows": len(rows), "scores": total, "cold_s": cold,
            "warm_median_s": statistics.median(warm), "most_harmful": rows[0][:2]}


def _child(run_dir: Path, targets: int, seed: int) -> dict:
    """Run the scoring in a fresh process so its peak RSS is the scoring's alone."""
    cmd = [sys.executable, "-m", "benchmarks.scale", "--score-only", str(run_dir),
           "--targets", str(targets), "--seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("SCALE_RESULT "):
            return json.loads(line.removeprefix("SCALE_RESULT "))
    raise RuntimeError(f"scoring process failed: {done.stderr.strip()[-2000:]}")


def report(result: dict) -> str:
    s, q, w = result["score"], result["query"], result["write"]
    rates = ", ".join(f"{name} {r / 1e9:.1f}" for name, r in s["matmul"]["rates"].items())
    written = (f"write: reused {w['reused']}" if "reused" in w else
               f"write: samples.parquet {w['samples_write_s']:.1f} s; {s['shards']} gradient "
               f"shards ({w['shard_bytes'] / 2**30:.2f} GiB) {w['shards_write_s']:.1f} s")
    return "\n".join([
        written,
        f"matmul float32, {s['torch_threads']} torch threads, GFLOP/s: {rates}; "
        f"machine rate (best, of before and after scoring) {s['matmul']['best'] / 1e9:.1f}",
        f"scoring {s['rows']:,} x k={s['k']} against {s['targets']:,} targets: "
        f"{s['seconds']:.1f} s, {s['flop_per_s'] / 1e9:.1f} GFLOP/s = "
        f"{s['fraction_of_matmul']:.0%} of the matmul rate; per CPU second "
        f"{s['flop_per_cpu_s'] / 1e9:.1f} GFLOP = {s['fraction_of_matmul_cpu']:.0%} of the "
        f"matmul's {s['matmul_best_per_cpu_s'] / 1e9:.1f}; peak RSS {s['peak_rss_mib']:,.0f} MiB"
        f" (at start {s['rss_start_mib']:,.0f} MiB); CPU/wall per thread "
        f"{s['cpu_per_wall_per_thread']:.2f}",
        f"DuckDB top 100 most harmful of {q['scores']:,} scores joined with samples: "
        f"cold {q['cold_s']:.3f} s, warm median {q['warm_median_s']:.3f} s",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="training samples")
    parser.add_argument("--k", type=int, default=1024, help="projected gradient width")
    parser.add_argument("--targets", type=int, default=1000, help="target rows (T)")
    parser.add_argument("--shard-rows", type=int, default=65_536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, help="keep the run here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--reuse", action="store_true",
                        help="with --dir: score the run already written there")
    parser.add_argument("--score-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.score_only:
        run = RunPaths(RUN_ID, args.score_only)
        print("SCALE_RESULT " + json.dumps(score_run(run, args.targets, args.seed)))
        return 0
    if min(args.n, args.k, args.targets, args.shard_rows) < 1:
        parser.error("--n, --k, --targets and --shard-rows must be >= 1")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(),
              "load_average_start": load_average()}
    with tempfile.TemporaryDirectory(prefix="sieve-scale-") as tmp:
        run = Store(args.dir or tmp).run(RUN_ID)
        run.dir.mkdir(parents=True, exist_ok=True)
        if args.reuse and complete_shards(run.gradients_dir(0, "train")):
            result["write"] = {"reused": str(run.dir)}
        else:
            print(f"writing {args.n:,} samples and {args.n:,} x {args.k} gradients to "
                  f"{run.dir}", flush=True)
            result["write"] = write_run(run, args.n, args.k, args.shard_rows, args.seed)
        print("scoring in a fresh process", flush=True)
        result["score"] = _child(run.dir, args.targets, args.seed)
        result["query"] = query_run(run)
    result["load_average_end"] = load_average()
    print(report(result))
    print(f"load average: start {result['load_average_start']}, "
          f"end {result['load_average_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
