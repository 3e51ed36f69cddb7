"""The shipped utility configs (configs/fairness.yaml, robustness.yaml, coreset.yaml) run
through ``sieve run`` (real Prefect, MLflow, DuckDB, Parquet, retraining), made smaller, and
their acceptance claims hold: pruning by demographic-parity influence lowers the test DP gap
against full data and random removal; pruning by robustness influence raises robust accuracy
against random removal; a 50% influence coreset beats random subsets of the same size; and
(configs/deletion.yaml) exact influence ranks the effect of deleting one class at a time."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from storage.metrics import read_metrics
from storage.store import Store

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def run_config(tmp_path: Path, name: str, *overrides: str) -> tuple[dict, list[dict], str]:
    """Run configs/<name>.yaml with overrides through the CLI; returns the retrain means
    {arm: {metric: mean over seeds}}, every metrics.parquet row, and the run id."""
    store = Store(tmp_path / name)
    args = ["run", "-c", str(CONFIGS / f"{name}.yaml"), "--store", str(store.root)]
    assert main(args + sets(*overrides)) == 0
    run = store.latest_run()
    rows = read_metrics(run.metrics).to_pylist()
    arms: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in rows:
        if m["stage"] == "retrain" and m["seed"] is not None:
            arms[m["estimator"]][m["name"]].append(m["value"])
    means = {arm: {k: float(np.mean(v)) for k, v in metrics.items()}
             for arm, metrics in arms.items()}
    return means, rows, run.run_id


def test_fairness_pruning_lowers_the_dp_gap(tmp_path, capsys):
    arms, rows, _ = run_config(tmp_path, "fairness", "prune.seeds=3",
                               "estimators=[random, tracin, if_exact]")
    out = capsys.readouterr().out
    assert "target demographic_parity" in out and "DP gap" in out
    scored = {m["estimator"] for m in rows if m["stage"] == "score"}
    assert {"if_exact", "tracin"} <= scored
    full, random = arms["full"]["dp_gap"], arms["random"]["dp_gap"]
    for name in ("if_exact", "tracin"):
        pruned = arms[f"pruned:{name}"]
        print(f"\n[fairness] {name}: DP gap {pruned['dp_gap']:.4f} (full {full:.4f}, random "
              f"{random:.4f}); accuracy {pruned['test_accuracy']:.4f} (full "
              f"{arms['full']['test_accuracy']:.4f})")
        assert pruned["dp_gap"] < full - 0.05
        assert pruned["dp_gap"] < random - 0.05
        assert pruned["target_cost"] < arms["full"]["target_cost"]


def test_robustness_pruning_raises_robust_accuracy(tmp_path, capsys):
    arms, rows, _ = run_config(tmp_path, "robustness", "prune.seeds=3", "train.epochs=15",
                               "train.checkpoints=3", "model.hidden=16",
                               "estimators=[random, if_exact]", "prune.by=if_exact")
    assert "robust acc %" in capsys.readouterr().out
    attack = {m["estimator"]: m["value"] for m in rows
              if m["stage"] == "attack" and m["name"] == "adversarial_accuracy"}
    clean = {m["estimator"]: m["value"] for m in rows
             if m["stage"] == "attack" and m["name"] == "clean_accuracy"}
    assert attack["test"] < clean["test"] - 0.2  # the frozen PGD examples are adversarial
    pruned, random = arms["pruned:if_exact"], arms["random"]
    print(f"\n[robustness] robust accuracy pruned {pruned['robust_accuracy']:.4f}, random "
          f"{random['robust_accuracy']:.4f}, full {arms['full']['robust_accuracy']:.4f}")
    assert pruned["robust_accuracy"] > random["robust_accuracy"] + 0.03


def test_coreset_beats_random_subsets(tmp_path, capsys):
    arms, rows, _ = run_config(tmp_path, "coreset", "prune.seeds=3", "train.epochs=15",
                               "train.checkpoints=3", "model.hidden=16",
                               "estimators=[random, if_exact]", "prune.by=if_exact")
    assert "if_exact: keep top 50%" in capsys.readouterr().out
    removed = [m["value"] for m in rows if m["stage"] == "prune" and m["name"] == "removed"]
    assert removed == [pytest.approx(0.5 * 1078, abs=1)]
    coreset, random = arms["pruned:if_exact"], arms["random"]
    print(f"\n[coreset] test accuracy keeping 50% by if_exact {coreset['test_accuracy']:.4f}, "
          f"random 50% {random['test_accuracy']:.4f}, full {arms['full']['test_accuracy']:.4f}")
    assert coreset["test_accuracy"] > random["test_accuracy"] + 0.01


def test_deletion_prediction_ranks_class_deletions(tmp_path, capsys):
    """Deleting one digit class at a time: exact influence ranks the actual change of the test
    loss (Spearman over the 10 classes) far better than random scores."""
    _, rows, _ = run_config(tmp_path, "deletion", "deletion.seeds=1", "train.epochs=15",
                            "train.checkpoints=2", "estimators=[random, if_exact]")
    assert "deletion prediction" in capsys.readouterr().out
    spearman = {m["estimator"]: m["value"] for m in rows
                if m["stage"] == "deletion" and m["name"] == "deletion_spearman"}
    actual = [m for m in rows if m["name"] == "deletion_actual"]
    predicted = [m for m in rows if m["name"] == "deletion_predicted"
                 and m["estimator"] == "if_exact"]
    assert len(actual) == len(predicted) == 10
    assert all(m["value"] > 0 for m in actual)  # deleting a class always costs test loss
    print(f"\n[deletion] one class at a time: Spearman if_exact {spearman['if_exact']:.3f}, "
          f"random {spearman['random']:.3f}")
    assert spearman["if_exact"] > 0.7


def test_a_fairness_target_without_groups_is_refused(tmp_path, capsys):
    store = Store(tmp_path / "store")
    code = main(["run", "--store", str(store.root), *sets("targets.utility=equalized_odds")])
    assert code == 2
    assert "0/1 group column" in capsys.readouterr().err
    assert not store.runs_dir.exists() or not any(store.runs_dir.iterdir())
