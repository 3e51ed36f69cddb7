"""Inputs of any shape, end to end through ``sieve run``: images in a fixed_size_list<float32>
column with attributed modules, and a model of several input columns called by keyword."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from sklearn.datasets import load_digits

from estimators.per_sample import per_sample_gradients
from estimators.targets import MarginTarget
from flows.cli import main
from storage.checkpoints import load_state_dict, read_checkpoint_index
from storage.gradient_shards import read_gradient_shard, read_shard_meta
from storage.store import Store
from tasks.config import load_resolved_config
from tasks.workload import load_workload
from workloads.inputs import take

N = 300
TINY = {"train": {"epochs": 3, "checkpoints": 2}, "prune": {"by": "tracin", "seeds": 1},
        "gradients": {"shard_size": 128}}

TWO_INPUTS = '''
import torch
from torch import nn

class Model(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.embed = nn.Embedding(17, 8)
        self.pixels = nn.Linear(64, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, pixels, bins, attention_mask):
        mask = attention_mask.unsqueeze(2).to(pixels.dtype)
        bags = (self.embed(bins) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(torch.tanh(self.pixels(pixels) + bags))

def make(num_classes, input_shapes):
    assert input_shapes["pixels"] == (64,), input_shapes
    return Model(num_classes)
'''


def _digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return (bunch.data[:N] / 16.0).astype(np.float32), bunch.target[:N].astype(np.int64)


def _run(tmp_path, config: dict) -> tuple[Store, object]:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config | TINY))
    store = Store(tmp_path / "store")
    assert main(["run", "--store", str(store.root), "-c", str(tmp_path / "run.yaml")]) == 0
    return store, store.latest_run()


def test_fixed_size_list_images_with_attributed_modules(tmp_path) -> None:
    x, label = _digits()
    flat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), 64)
    pq.write_table(pa.table({"image": flat, "label": label}), tmp_path / "images.parquet")
    store, run = _run(tmp_path, {
        "data": {"path": str(tmp_path / "images.parquet"), "shapes": {"image": [1, 8, 8]},
                 "noise": 0.2},
        "model": {"name": "cnn", "modules": ["3", "7"]},  # second conv and the head
        "task": {"measurement": "margin"},
        "estimators": ["loss", "ip", "tracin", "if_exact"],
    })
    meta = json.loads(pq.read_schema(run.samples).metadata[b"inputs"])
    assert meta == {"image": [1, 8, 8]}
    shard = read_shard_meta(run.gradients_dir(0, "train") / "part-0.parquet")
    assert shard.parameter_order == ["3.weight", "3.bias", "7.weight", "7.bias"]
    assert shard.parameter_count == 16 * 8 * 9 + 16 + 10 * 64 + 10 == shard.k
    for estimator in ("loss", "ip", "tracin", "if_exact"):
        scores = pq.read_table(run.scores_dir(estimator, "val_loss") / "part-0.parquet")
        assert np.isfinite(scores["score"].to_numpy()).all()
        assert scores.num_rows == 180
    # the stored val rows are gradients of the measurement (minus the margin), train rows of
    # the cross-entropy, both over the attributed parameters only
    config = load_resolved_config(run.config)
    work = load_workload(run, config)
    record = read_checkpoint_index(run.checkpoints_dir)[0]
    model = work.attributed()
    model.load_state_dict(load_state_dict(record.path, record.sha256))
    for split, cost in (("val", MarginTarget().cost), ("train", None)):
        ids, stored = read_gradient_shard(run.gradients_dir(0, split) / "part-0.parquet")
        rows = work.rows(split)[: len(ids)]
        expected = per_sample_gradients(model.eval(), take(work.x, rows), work.y[rows], cost=cost)
        torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-6)


def test_several_input_columns_by_keyword(tmp_path, monkeypatch) -> None:
    x, label = _digits()
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 6, N)
    bins = [(x[i, :8] * 16).astype(np.int64)[: lengths[i]].tolist() for i in range(N)]
    pq.write_table(pa.table({
        "pixels": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64),
        "bins": pa.array(bins, pa.list_(pa.int32())),
        "attention_mask": pa.array([[1] * n for n in lengths], pa.list_(pa.int8())),
        "label": label,
    }), tmp_path / "multi.parquet")
    (tmp_path / "two_inputs.py").write_text(TWO_INPUTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    store, run = _run(tmp_path, {
        "data": {"path": str(tmp_path / "multi.parquet"), "noise": 0.2},
        "model": {"factory": "two_inputs:make"},
        "estimators": ["loss", "ip", "tracin", "if_ekfac", "trak"],
    })
    meta = json.loads(pq.read_schema(run.samples).metadata[b"inputs"])
    assert meta == {"pixels": [64], "bins": [5], "attention_mask": [5]}
    shard = read_shard_meta(run.gradients_dir(0, "train") / "part-0.parquet")
    assert shard.parameter_order == ["embed.weight", "pixels.weight", "pixels.bias",
                                     "head.weight", "head.bias"]
    for estimator in ("loss", "ip", "tracin", "if_ekfac", "trak"):
        scores = pq.read_table(run.scores_dir(estimator, "val_loss") / "part-0.parquet")
        assert np.isfinite(scores["score"].to_numpy()).all()
