"""Ground truth by retraining: a model trained without a set of samples, and how it does on
every validation and test sample. Each outcome is cached in the store by (model, recipe, data,
removed set, seed), so any later evaluation with the same retrain reuses it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.atomic import read_parquet_table, write_parquet_atomic
from storage.location import StorePath, store_path
from storage.store import RunPaths
from tasks.config import Config
from tasks.retrain import train_without
from tasks.workload import Workload, load_workload
from workloads.inputs import call_model, take

OUTCOME_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("split", pa.string()),
    ("loss", pa.float64()),
    ("margin", pa.float64()),
    ("correct", pa.bool_()),
])


@dataclass(frozen=True)
class Outcome:
    """A retrained model's per-sample results on the val and test splits (aligned arrays):
    loss in nats against the labels as trained (test: clean labels where known), margin =
    logit_y - logsumexp of the other logits, correct = argmax equals the label."""

    sample_id: np.ndarray
    split: np.ndarray
    loss: np.ndarray
    margin: np.ndarray
    correct: np.ndarray

    def summed_loss(self, split: str) -> float:
        return float(self.loss[self.split == split].sum())

    def accuracy(self, split: str = "test") -> float:
        return float(self.correct[self.split == split].mean())

    def margins(self, ids: np.ndarray) -> np.ndarray:
        index = {int(s): k for k, s in enumerate(self.sample_id)}
        return self.margin[[index[int(i)] for i in ids]]


def data_fingerprint(work: Workload) -> str:
    """sha256 of what training sees: ids, splits, labels and inputs."""
    h = hashlib.sha256()
    s = work.samples
    for array in (s.sample_id, s.label, *s.inputs.values()):
        h.update(np.ascontiguousarray(array).tobytes())
    h.update("|".join(s.split.tolist()).encode())
    return h.hexdigest()


# Bump when what a retrain means changes (the cache key must then change with it).
# 2: same initialization, data order and schedule, removed samples dropped from their batches.
RETRAIN_PROTOCOL = 2


def retrain_key(config: Config, fingerprint: str, removed: tuple[int, ...], seed: int) -> str:
    spec = {
        "protocol": RETRAIN_PROTOCOL,
        "model": config.model.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json", exclude={"checkpoints", "models"}),
        "data": fingerprint,
        "removed": sorted(removed),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def outcome_path(store_root: str, key: str) -> StorePath:
    """The store-level retrain cache entry ``retrains/<key>.parquet`` (local or a URL)."""
    return store_path(store_root) / "retrains" / f"{key}.parquet"


@task(name="retrain-outcome", cache_policy=NO_CACHE)
def retrain_outcome(
    run: RunPaths, config: Config, store_root: str, removed: tuple[int, ...], seed: int
) -> tuple[Path, bool]:
    """Train without ``removed`` (sample ids) with ``seed`` unless the store already holds that
    outcome; returns (its Parquet path, whether it was computed now)."""
    work = load_workload(run, config)
    path = outcome_path(store_root, retrain_key(config, data_fingerprint(work), removed, seed))
    if path.exists():
        return path, False
    model = train_without(work, removed, seed).eval()
    rows = np.concatenate([work.rows("val"), work.rows("test")])
    labels = torch.where(torch.from_numpy(work.samples.split[rows] == "test"),
                         work.test_labels()[rows], work.y[rows])
    with torch.no_grad():
        logits = call_model(model, take(work.x, rows)).to(torch.float64)
    loss = F.cross_entropy(logits, labels, reduction="none")
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(dim=1)
    table = pa.table({
        "sample_id": work.samples.sample_id[rows],
        "split": work.samples.split[rows],
        "loss": loss.numpy(),
        "margin": (true - others).numpy(),
        "correct": (logits.argmax(1) == labels).numpy(),
    }, schema=OUTCOME_SCHEMA)
    write_parquet_atomic(table, path)
    return path, True


def read_outcome(path: Path) -> Outcome:
    table = read_parquet_table(path)
    return Outcome(*(table[name].to_numpy(zero_copy_only=False) for name in OUTCOME_SCHEMA.names))
