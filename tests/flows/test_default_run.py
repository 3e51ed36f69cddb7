"""The embedded default run (digits, MLP, 20% flipped labels, 30 epochs, 5 checkpoints, prune
10% by TracIn, 5 retrain seeds), unchanged: its headline claims hold."""

from __future__ import annotations

import numpy as np

from flows.cli import main
from storage.metrics import read_metrics
from storage.store import Store


def test_default_run_detects_and_pruning_helps(tmp_path, capsys):
    store = Store(tmp_path / "store")
    assert main(["run", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    run = store.latest_run()
    assert run.run_id in out and "tracin" in out and "mlflow ui" in out
    metrics = read_metrics(run.metrics).to_pylist()
    auc = [m["value"] for m in metrics if m["name"] in ("detection_auc", "suspicion_auc")]
    assert max(auc) >= 0.95
    accuracy: dict[str, list[float]] = {}
    for m in metrics:
        if m["stage"] == "retrain" and m["name"] == "test_accuracy":
            accuracy.setdefault(m["estimator"], []).append(m["value"])
    assert all(len(v) == 5 for v in accuracy.values())
    pruned = np.mean(accuracy["pruned:tracin"])
    print(f"\n[default run] best AUC {max(auc):.3f}; test accuracy pruned {pruned:.4f}, "
          f"full {np.mean(accuracy['full']):.4f}, random {np.mean(accuracy['random']):.4f}")
    assert pruned - np.mean(accuracy["full"]) >= 0.01
    assert pruned - np.mean(accuracy["random"]) >= 0.01
