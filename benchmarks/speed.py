"""``python -m benchmarks.speed [--quick] [--json PATH] [--sections 1,2,3]``

1. per-sample gradient throughput: Sieve vs a naive autograd loop vs peers (captum, dattri,
   traker), on the digits MLP and the small CNN;
2. stage times and peak RSS of Sieve's pipeline pieces on the default workload;
3. gradient shard read throughput, Sieve's reader vs pyarrow on fixed_size_list<float32>.

Every number printed is measured in this run. ``--quick`` is a smoke version (seconds).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks._measure import load_average

PEERS = ("captum", "dattri", "traker", "kronfluence")
DETAIL = ("checkpoints", "epochs", "shards", "bytes", "per_sample_gradients_s",
          "first_shard_gradients_s", "write_shards_s", "rows", "warm_query_seconds")


def _num(value, fmt: str = "{:,.0f}", missing: str = "–") -> str:
    return missing if value is None else fmt.format(value)


def _ratio(value) -> str:
    return _num(value, "{:.2f}×")


def _mib(value) -> str:
    return _num(value, "{:,.1f}")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in PEERS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def per_sample_tables(result: dict) -> list[Table]:
    info = result["info"]
    tables = []
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        d = info["d"].get(model)
        table = Table(title=f"1. per-sample gradients: {model}, d={d}, n={info['samples']}, "
                            f"batch {info['batch']}, k={info['k']}, median of "
                            f"{info['repeats']}", title_justify="left")
        for col, justify in (("method", "left"), ("samples/s", "right"), ("vs Sieve", "right"),
                             ("vs naive loop", "right"), ("peak RSS Δ MiB", "right"),
                             ("CPU/wall", "right"), ("max rel. diff vs Sieve", "right"),
                             ("note", "left")):
            table.add_column(col, justify=justify, no_wrap=col == "method")
        group = None
        for row in (r for r in result["rows"] if r["model"] == model):
            if group is not None and row["group"] != group:
                table.add_section()
            group = row["group"]
            if row["failed"]:
                table.add_row(row["method"], "failed", "", "", "", "", "", row["failed"])
                continue
            table.add_row(
                row["method"], _num(row["samples_per_s"]), _ratio(row["ratio_sieve"]),
                _ratio(row["ratio_naive"]), _mib(row["peak_delta_mib"]),
                _num(row["cpu_per_wall"], "{:.2f}"), _num(row["max_rel_diff"], "{:.1e}"),
                row["note"],
            )
        tables.append(table)
    return tables


def pipeline_tables(result: dict) -> list[Table]:
    stages = Table(title="2. pipeline stages, each in a fresh process, no Prefect/MLflow "
                         f"(config overrides: {', '.join(result['info']['overrides'])})",
                   title_justify="left")
    for col, justify in (("stage", "left"), ("seconds", "right"), ("share of total", "right"),
                         ("samples/s", "right"), ("peak RSS MiB", "right"),
                         ("peak RSS Δ MiB", "right"), ("CPU/wall", "right"), ("detail", "left")):
        stages.add_column(col, justify=justify)
    for row in result["stages"]:
        if "failed" in row:
            stages.add_row(row["stage"], "failed", "", "", "", "", "", row["failed"])
            continue
        detail = {k: v for k, v in row.items() if k in DETAIL}
        for key in ("warm_query_seconds", "per_sample_gradients_s", "first_shard_gradients_s",
                    "write_shards_s"):
            if key in detail:
                detail[key] = round(detail[key], 4 if key == "warm_query_seconds" else 3)
        if "bytes" in detail:
            detail["MiB written"] = round(detail.pop("bytes") / 2**20, 1)
        stages.add_row(
            row["stage"], _num(row.get("seconds"), "{:.3f}"),
            _num(row.get("share_of_total"), "{:.1%}"), _num(row.get("samples_per_s")),
            _mib(row.get("peak_rss_mib")), _mib(row.get("peak_delta_mib")),
            _num(row.get("cpu_per_wall"), "{:.2f}"),
            ", ".join(f"{k}={v}" for k, v in detail.items()),
        )
    scores = Table(title="2b. scoring per estimator (estimator.score only; gradients read from "
                         "the Parquet shards)", title_justify="left")
    for col, justify in (("estimator", "left"), ("seconds", "right"), ("vs tracin", "right"),
                         ("share of total", "right"), ("peak RSS MiB", "right"),
                         ("peak RSS Δ MiB", "right"), ("CPU/wall", "right"), ("status", "left")):
        scores.add_column(col, justify=justify)
    for row in result["scores"]:
        name = row["stage"].split(":", 1)[1]
        if "failed" in row:
            scores.add_row(name, "failed", "", "", "", "", "", row["failed"])
            continue
        scores.add_row(name, _num(row["seconds"], "{:.3f}"), _ratio(row.get("ratio_tracin")),
                       _num(row.get("share_of_total"), "{:.1%}"), _mib(row["peak_rss_mib"]),
                       _mib(row.get("peak_delta_mib")), _num(row.get("cpu_per_wall"), "{:.2f}"),
                       "ok")
    return [stages, scores]


def shard_table(result: dict) -> Table:
    info = result["info"]
    table = Table(title=f"3. gradient shard reads: {info['rows']} rows × k={info['k']} float32 "
                        f"({info['payload_mib']:.1f} MiB payload), warm page cache, median of "
                        f"{info['repeats']}", title_justify="left")
    for col, justify in (("method", "left"), ("GB/s", "right"), ("vs Sieve", "right"),
                         ("median s", "right"), ("file MiB", "right"),
                         ("peak RSS Δ MiB", "right"), ("CPU/wall", "right"),
                         ("equals input", "left")):
        table.add_column(col, justify=justify, no_wrap=col == "method")
    for row in result["rows"]:
        if "failed" in row:
            table.add_row(row["method"], "failed", "", "", "", "", "", row["failed"])
            continue
        median = sorted(row["seconds"])[len(row["seconds"]) // 2]
        exact = {True: "yes", False: "NO"}.get(row.get("exact"), "– (not a tensor)")
        table.add_row(row["method"], _num(row["gb_per_s"], "{:.2f}"), _ratio(row["ratio_sieve"]),
                      _num(median, "{:.4f}"), _mib(row["file_mib"]),
                      _mib(row["peak_delta_mib"]), _num(row["cpu_per_wall"], "{:.2f}"), exact)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke version")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument("--sections", default="1,2,3", help="which sections (default 1,2,3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"1", "2", "3"}
    if unknown or args.repeats < 1:
        parser.error(f"--sections takes 1, 2, 3 (got {sorted(unknown)}); --repeats >= 1")

    torch.set_num_threads(1)
    console = Console(width=int(os.environ.get("SIEVE_BENCH_WIDTH", "240")))
    started = time.perf_counter()
    meta = {"mode": "quick" if args.quick else "full", "versions": versions(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_start": load_average()}
    console.print(f"Sieve speed benchmarks ({meta['mode']}): "
                  + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    console.print(f"torch threads {meta['torch_threads']}; load average at start "
                  f"{meta['load_average_start']}")
    results: dict = {"meta": meta}
    if "1" in sections:
        from benchmarks import per_sample

        results["per_sample"] = per_sample.run_section(args.quick, args.repeats)
        for table in per_sample_tables(results["per_sample"]):
            console.print(table)
    if "2" in sections:
        from benchmarks import pipeline

        results["pipeline"] = pipeline.run_section(args.quick)
        for table in pipeline_tables(results["pipeline"]):
            console.print(table)
    if "3" in sections:
        from benchmarks import shard_read

        results["shard_read"] = shard_read.run_section(args.quick, args.repeats)
        console.print(shard_table(results["shard_read"]))
    meta["load_average_end"] = load_average()
    meta["wall_seconds"] = time.perf_counter() - started
    console.print(f"load average at end {meta['load_average_end']}; "
                  f"wall {meta['wall_seconds']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
        console.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
