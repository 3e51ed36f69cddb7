"""A user's own Parquet data (list feature column, own sample ids and groups) and own model
factory, end to end; then the trained checkpoints attributed again without training."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from sklearn.datasets import load_digits

from flows.cli import main
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


def test_own_data_and_model(tmp_path, monkeypatch):
    ids, config = _user_files(tmp_path, monkeypatch)
    store = Store(tmp_path / "store")
    assert main(["run", "--store", str(store.root), "-c", str(config)]) == 0
    run = store.latest_run()
    samples = pq.read_table(run.samples)
    assert sorted(samples["sample_id"].to_pylist()) == ids.tolist()
    assert set(samples["group"].to_pylist()) == {0, 1}
    scored = pq.read_table(run.scores_dir("ip", "val_loss") / "part-0.parquet")
    train_ids = {r["sample_id"] for r in samples.to_pylist() if r["split"] == "train"}
    assert set(scored["sample_id"].to_pylist()) == train_ids


def _external_model(tmp_path, monkeypatch):
    """The user's data with its own split column, and a model trained outside Sieve (plain
    torch) saved as two checkpoint files; returns (ids, split, config path, checkpoints arg)."""
    ids, config = _user_files(tmp_path, monkeypatch)
    table = pq.read_table(tmp_path / "mine.parquet")
    split = np.where(np.arange(len(ids)) % 5 == 0, "test",
                     np.where(np.arange(len(ids)) % 5 == 1, "val", "train"))
    pq.write_table(table.append_column("split", pa.array(split)), tmp_path / "mine.parquet")
    import my_models

    torch.manual_seed(3)
    model = my_models.make_model(64, 10)
    train = split == "train"
    x = torch.tensor(np.stack(table["pixels"].to_pylist())[train], dtype=torch.float32)
    y = torch.tensor(table["digit"].to_numpy()[train])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    files = []
    for epoch in range(2):
        for start in range(0, len(y), 32):
            loss = torch.nn.functional.cross_entropy(model(x[start:start + 32]),
                                                     y[start:start + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
        files.append(tmp_path / f"external-{epoch}.pt")
        torch.save(model.state_dict(), files[-1])
    listed = "[" + ", ".join(f"{{path: {f}, lr: 0.1}}" for f in files) + "]"
    return ids, split, config, f"train.checkpoints={listed}"


def test_existing_model_is_attributed_without_training(tmp_path, monkeypatch, capsys):
    """A model trained outside Sieve, given as checkpoint files with their learning rates,
    on the user's Parquet data (with its own split column): no training, and train x test
    attributions keyed by the user's sample ids."""
    ids, split, config, checkpoints = _external_model(tmp_path, monkeypatch)
    store = Store(tmp_path / "store")
    assert main(["run", "--store", str(store.root), "-c", str(config),
                 "--set", checkpoints, "--set", "data.noise=0",
                 "--set", "targets.pairwise=true", "--set", "targets.test_samples=15"]) == 0
    run = store.latest_run()
    assert not list(run.checkpoints_dir.glob("*.pt")), "no training: no checkpoint files"

    capsys.readouterr()
    sql = """select estimator, count(*) as n, count(distinct train_id) as trains,
             count(distinct test_id) as tests, min(train_id) as lo, max(test_id) as hi
             from attributions group by 1 order by 1"""
    assert main(["query", "--store", str(store.root), "--format", "json", sql]) == 0
    rows = json.loads(capsys.readouterr().out)
    n_train, n_test = int((split == "train").sum()), 15
    assert [r["estimator"] for r in rows] == ["ip", "tracin"]  # loss has no pairwise form
    for r in rows:
        assert (r["trains"], r["tests"], r["n"]) == (n_train, n_test, n_train * n_test)
        assert r["lo"] >= 100_000 and r["hi"] <= ids.max()
    test_ids = set(ids[split == "test"].tolist())
    got = pq.read_table(run.attributions_dir("ip") / "part-0.parquet")
    assert set(got["test_id"].to_pylist()) <= test_ids


def test_existing_model_through_evaluate(tmp_path, monkeypatch, capsys):
    """The same external model judged by counterfactual evaluation (retrains use the
    configured recipe)."""
    _, _, config, checkpoints = _external_model(tmp_path, monkeypatch)
    store = Store(tmp_path / "store")
    small = ["evaluate.loo.samples=5", "evaluate.loo.seeds=1", "evaluate.lds.subsets=5",
             "evaluate.lds.seeds=1", "evaluate.lds.targets=10", "evaluate.prune_curve.seeds=1",
             "evaluate.prune_curve.fractions=[0.1]", "train.epochs=2", "data.noise=0"]
    args = [a for item in [checkpoints, *small] for a in ("--set", item)]
    assert main(["evaluate", "--store", str(store.root), "-c", str(config), *args]) == 0
    capsys.readouterr()
    assert main(["query", "--store", str(store.root), "--format", "json",
                 "select distinct estimator from evaluation where metric = 'lds'"]) == 0
    assert {r["estimator"] for r in json.loads(capsys.readouterr().out)} == {"ip", "tracin"}
