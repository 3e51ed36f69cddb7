"""A local store vs an S3 store (moto's S3 server on 127.0.0.1, in this process): gradient shard
write and read throughput through ``storage.gradient_shards``, then the wall time of one
``sieve run`` with the same config on each store.

    python -m benchmarks.object_store                       # 8 shards of 4,096 x 1,024; tiny run
    python -m benchmarks.object_store --run default         # the embedded default config's run
    python -m benchmarks.object_store --shards 16 --rows 8192 --k 1024 --run none

moto keeps objects in memory and serves them from a Python thread of this process, so its
figures bound what the store's code costs over HTTP (requests, copies), not a real S3's network.
MB/s counts the gradient payload (rows * k * 4 bytes), 1 MB = 1e6 bytes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from storage.gradient_shards import ShardMeta, read_gradient_shard, shard_path, write_gradient_shard
from storage.store import Store

TINY = ["train.epochs=3", "train.checkpoints=2", "estimators=[ip, tracin]", "prune.by=tracin",
        "prune.seeds=1", "gradients.shard_size=256", "gradients.projection=64"]
BUCKET = "bench"


def shard_throughput(store: Store, shards: int, rows: int, k: int) -> tuple[float, float]:
    """(write MB/s, read MB/s) of ``shards`` shards of (rows, k) float32 in ``store``."""
    meta = ShardMeta("float32", None, k, None, ["w"], k, 0, "bench", "train")
    grads = torch.randn(rows, k, generator=torch.Generator().manual_seed(0))
    ids = np.arange(rows, dtype=np.int64)
    folder = store.run("bench").gradients_dir(0, "train")
    started = time.perf_counter()
    for part in range(shards):
        write_gradient_shard(shard_path(folder, part), ids, grads, meta)
    written = time.perf_counter() - started
    started = time.perf_counter()
    for part in range(shards):
        read_gradient_shard(shard_path(folder, part))
    read = time.perf_counter() - started
    payload = shards * rows * k * 4 / 1e6
    return payload / written, payload / read


def run_seconds(store: Store, overrides: list[str]) -> float:
    from flows.cli import main

    args = [arg for item in overrides for arg in ("--set", item)]
    started = time.perf_counter()
    if main(["run", "-q", "--store", str(store), *args]) != 0:
        raise RuntimeError(f"sieve run on {store} failed")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--run", choices=["tiny", "default", "none"], default="tiny")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tests.storage.moto_s3 import s3_server

    with tempfile.TemporaryDirectory(prefix="sieve-bench-") as folder, s3_server(BUCKET):
        os.environ.setdefault("SIEVE_CACHE_DIR", str(Path(folder) / "cache"))
        stores = {"local": lambda name: Store(Path(folder) / name),
                  "s3 (moto)": lambda name: Store(f"s3://{BUCKET}/{name}")}
        size = args.shards * args.rows * args.k * 4 / 2**20
        print(f"gradient shards: {args.shards} x ({args.rows} x {args.k}) float32, {size:.0f} MiB")
        for label, make in stores.items():
            write, read = shard_throughput(make("shards"), args.shards, args.rows, args.k)
            print(f"  {label:10} write {write:7.1f} MB/s   read {read:7.1f} MB/s")
        if args.run != "none":
            overrides = TINY if args.run == "tiny" else []
            seconds = {label: run_seconds(make("runs"), overrides)
                       for label, make in stores.items()}  # the first pays Prefect's start
            seconds["local, again"] = run_seconds(stores["local"]("runs-2"), overrides)
            print(f"sieve run ({args.run} config), wall seconds:")
            for label, value in seconds.items():
                print(f"  {label:12} {value:6.1f} s")


if __name__ == "__main__":
    main()
