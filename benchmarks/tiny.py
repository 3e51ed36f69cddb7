"""A tiny but complete ``sieve run`` for reliability trials (crash, concurrency, soak): every
stage runs (train, gradients, score, prune, retrain) in a few seconds.

300 of scikit-learn's digits (written to a Parquet file: 180 train, 60 val, 60 test),
logistic regression, 3 epochs with 2 checkpoints, loss and TracIn (TracIn reads the stored
gradients of every checkpoint), 96-row gradient shards (3 per checkpoint: 6 shard tasks),
pruning by TracIn with 1 retrain seed (3 retrains). Few tasks keep Prefect's share small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SAMPLES = 300
STAGES = ("train", "gradients", "score", "prune", "retrain")
# a `sieve run` in a fresh interpreter, as the console script runs it
SIEVE = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]


def write_data(path: Path) -> Path:
    """The first ``SAMPLES`` digits as a Parquet table: 64 float32 pixel columns and ``label``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data[:SAMPLES] / 16.0).astype(np.float32)
    columns = {f"p{i}": x[:, i] for i in range(x.shape[1])}
    columns["label"] = bunch.target[:SAMPLES].astype(np.int64)
    pq.write_table(pa.table(columns), path)
    return path


def overrides(data: Path, seed: int = 0) -> list[str]:
    """The ``--set`` values (key=value) of the tiny run on ``data`` with ``seed``."""
    return [
        f"seed={seed}",
        f"data.path={data}",
        "data.noise=0.2",
        "model.name=logreg",
        "train.epochs=3",
        "train.checkpoints=2",
        "estimators=[loss,tracin]",
        "prune.by=tracin",
        "prune.seeds=1",
        "gradients.shard_size=96",
    ]


def run_args(store: Path, data: Path, seed: int = 0) -> list[str]:
    """``sieve`` arguments of the tiny run (``run --store STORE --set ...``)."""
    return ["run", "--store", str(store), *[a for kv in overrides(data, seed)
                                             for a in ("--set", kv)]]
