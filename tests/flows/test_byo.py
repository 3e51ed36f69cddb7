"""A user's own Parquet data (list feature column, own sample ids and groups) and own model
factory, end to end; then the trained checkpoints attributed again without training."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from sklearn.datasets import load_digits

from flows.cli import main
from storage.checkpoints import read_checkpoint_index
from storage.store import Store

FACTORY = '''
from torch import nn

def make_model(input_dim, num_classes):
    return nn.Sequential(nn.Linear(input_dim, 16), nn.ReLU(), nn.Linear(16, num_classes))
'''


def _user_files(tmp_path, monkeypatch):
    digits = load_digits()
    n = 600
    ids = 100_000 + 7 * np.arange(n)
    table = pa.table({
        "sample_id": ids,
        "pixels": [row.tolist() for row in digits.data[:n] / 16.0],
        "digit": digits.target[:n],
        "group": (digits.target[:n] % 2).astype(np.int64),
    })
    pq.write_table(table, tmp_path / "mine.parquet")
    (tmp_path / "my_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {
        "data": {"path": str(tmp_path / "mine.parquet"), "label_column": "digit",
                 "group_column": "group", "noise": 0.1},
        "model": {"factory": "my_models:make_model"},
        "train": {"epochs": 4, "checkpoints": 2},
        "estimators": ["loss", "ip", "tracin"],
        "prune": {"by": "ip", "seeds": 1},
    }
    (tmp_path / "byo.yaml").write_text(yaml.safe_dump(config))
    return ids, tmp_path / "byo.yaml"


def test_own_data_and_model_then_existing_checkpoints(tmp_path, monkeypatch):
    ids, config = _user_files(tmp_path, monkeypatch)
    store = Store(tmp_path / "store")
    assert main(["run", "--store", str(store.root), "-c", str(config)]) == 0
    first = store.latest_run()
    samples = pq.read_table(first.samples)
    assert sorted(samples["sample_id"].to_pylist()) == ids.tolist()
    assert set(samples["group"].to_pylist()) == {0, 1}
    scored = pq.read_table(first.scores_dir("ip", "val_loss") / "part-0.parquet")
    train_ids = {r["sample_id"] for r in samples.to_pylist() if r["split"] == "train"}
    assert set(scored["sample_id"].to_pylist()) == train_ids

    records = read_checkpoint_index(first.checkpoints_dir)
    listed = "[" + ", ".join(f"{{path: {r.path}, lr: {r.lr}}}" for r in records) + "]"
    assert main(["run", "--store", str(store.root), "-c", str(config),
                 "--set", f"train.checkpoints={listed}"]) == 0
    second = store.latest_run()
    assert second.run_id != first.run_id
    assert not list(second.checkpoints_dir.glob("*.pt")), "no training: no new checkpoint files"
    again = pq.read_table(second.scores_dir("ip", "val_loss") / "part-0.parquet")
    np.testing.assert_array_equal(again["score"].to_numpy(), scored["score"].to_numpy())
