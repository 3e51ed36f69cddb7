"""The evaluation flow, small: ground truth by retraining (cached in the store and reused by
a second evaluation), LOO / LDS / detection / prune curve per estimator, in DuckDB and MLflow."""

from __future__ import annotations

import json

import numpy as np

from flows.cli import main
from storage.metrics import read_metrics
from storage.store import Store
from tests.flows.conftest import sets

SMALL_EVALUATION = [
    "model.name=logreg", "train.epochs=8", "train.checkpoints=2",
    "estimators=[random,ip,tracin,if_exact,trak]", "prune.by=ip",
    "evaluate.loo.samples=12", "evaluate.loo.seeds=1",
    "evaluate.lds.subsets=10", "evaluate.lds.seeds=1", "evaluate.lds.targets=15",
    "evaluate.prune_curve.fractions=[0.05,0.2]", "evaluate.prune_curve.seeds=1",
    "evaluate.brittleness.enabled=true", "evaluate.brittleness.targets=3",
    "evaluate.brittleness.ks=[5,60]", "evaluate.brittleness.seeds=1",
]


def _evaluation(store: Store, capsys) -> dict[tuple[str, str], float]:
    capsys.readouterr()
    assert main(["query", "--store", str(store.root), "--format", "json",
                 "select estimator, metric, value from evaluation"]) == 0
    return {(r["estimator"], r["metric"]): r["value"] for r in json.loads(capsys.readouterr().out)}


def test_evaluate_then_reuse_the_retrains(tmp_path, capsys):
    store = Store(tmp_path / "store")
    assert main(["evaluate", "--store", str(store.root), *sets(*SMALL_EVALUATION)]) == 0
    out = capsys.readouterr().out
    assert "LDS" in out and "if_exact" in out
    first = store.latest_run()
    assert f"report: {(first.dir / 'report.html').as_uri()}" in out
    report = (first.dir / "report.html").read_text()
    assert 'id="summary-table"' in report and "LDS (95% CI)" in report
    assert 'alt="LDS"' in report and 'alt="prune curves"' in report
    table = _evaluation(store, capsys)
    for name in ("ip", "tracin", "if_exact", "trak"):
        assert -1 <= table[(name, "lds")] <= 1
        assert table[(name, "lds_low")] <= table[(name, "lds")] <= table[(name, "lds_high")]
        assert np.isfinite(table[(name, "loo_spearman")])
        assert 0 <= table[(name, "detection_auc")] <= 1
        assert (name, "prune_gain@0.2") in table
    # removing a target's top-60 supporters (a superset of its top 5) flips at least as many
    assert (0 <= table[("if_exact", "brittleness_flipped@5")]
            <= table[("if_exact", "brittleness_flipped@60")] <= 1)
    assert 0 <= table[("random_removal", "brittleness_flipped@60")] <= 1
    # the influence function tracks the margins of retrained models; random scores don't
    assert table[("if_exact", "lds")] > 0.3
    assert abs(table[("random", "loo_spearman")]) < table[("if_exact", "loo_spearman")]
    trained = {m["name"]: m["value"] for m in read_metrics(first.metrics).to_pylist()
               if m["stage"] == "groundtruth"}
    assert trained["retrains_trained"] > 20 and trained["retrains_reused"] == 0

    capsys.readouterr()
    assert main(["evaluate", "--store", str(store.root), "--json",
                 *sets(*SMALL_EVALUATION)]) == 0
    printed = json.loads(capsys.readouterr().out)  # --json: stdout is one JSON object
    second = store.latest_run()
    assert printed["run_id"] == second.run_id and printed["command"] == "evaluate"
    assert printed["report"] == str(second.dir / "report.html")
    assert second.run_id != first.run_id
    reused = {m["name"]: m["value"] for m in read_metrics(second.metrics).to_pylist()
              if m["stage"] == "groundtruth"}
    assert reused["retrains_trained"] == 0
    assert reused["retrains_reused"] == trained["retrains_trained"]
    again = _evaluation(store, capsys)
    assert again[("if_exact", "lds")] == table[("if_exact", "lds")]
    rows = {r["estimator"]: r for r in printed["rows"]}
    assert rows["if_exact"]["lds"] == again[("if_exact", "lds")]
