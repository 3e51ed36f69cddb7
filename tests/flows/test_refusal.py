"""Estimators that cannot run on the model: named, the run is refused before any stage (exit 2,
one line, nothing written; also a docs/errors.md row); with ``estimators: all`` they are
skipped, shown as ``skipped: <reason>`` in the table, the report and the JSON, and the others
complete."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest

from estimators.registry import ESTIMATORS
from flows.cli import main
from presentation.report import print_run_summary
from presentation.summaries import RunSummary
from storage.store import Store
from tasks.config import load_resolved_config
from tests.flows.conftest import sets

# synthetic 64-feature data, MLP 64-100-10: d = 7,510 trainable parameters > if_exact's
# default max_params (6,000); 60 samples, 2 epochs, so every estimator is quick.
WIDE = ["data.name=synthetic", "data.synthetic.n=60", "data.synthetic.input_dim=64",
        "data.synthetic.classes=10", "model.name=mlp", "model.hidden=100", "train.epochs=2",
        "train.checkpoints=2", "train.batch_size=16", "prune.seeds=1", "gradients.shard_size=64"]


def test_named_estimator_that_cannot_run_is_refused_before_any_stage(tmp_path, capsys):
    store = Store(tmp_path / "store")
    capsys.readouterr()
    code = main(["run", "--store", str(store.root),
                 *sets(*WIDE, "estimators=[ip, if_exact]", "prune.by=ip")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: estimator if_exact cannot run on this model: ") and \
        "\n" not in err, err
    assert "d=7510" in err and "max_params >= 7510" in err and "if_cg" in err
    assert not store.runs_dir.exists() or not any(store.runs_dir.iterdir())


@pytest.fixture(scope="module")
def all_run(tmp_path_factory) -> tuple[Store, dict]:
    """One ``estimators: all`` run on the wide model, with its --json output."""
    store = Store(tmp_path_factory.mktemp("all-store"))
    with redirect_stdout(io.StringIO()) as out:
        code = main(["run", "--store", str(store.root), "--json",
                     *sets(*WIDE, "estimators=all")])
    assert code == 0
    return store, json.loads(out.getvalue())


def test_all_skips_it_and_the_others_complete(all_run):
    store, out = all_run
    rows = {r["estimator"]: r for r in out["rows"]}
    assert set(rows) == set(ESTIMATORS)
    assert rows["if_exact"] == {"estimator": "if_exact", "skipped": rows["if_exact"]["skipped"]}
    assert rows["if_exact"]["skipped"].startswith("if_exact builds a dense d x d curvature")
    assert "max_params >= 7510" in rows["if_exact"]["skipped"]
    for name in set(ESTIMATORS) - {"if_exact"}:
        assert "skipped" not in rows[name] and rows[name]["seconds"] >= 0, rows[name]
    run = store.existing_run(out["run_id"])
    config = load_resolved_config(run.config)
    assert list(config.skipped) == ["if_exact"]
    assert "if_exact" not in [e.name for e in config.estimators]
    html = (run.dir / "report.html").read_text()
    assert "skipped: if_exact builds a dense d x d curvature matrix" in html


def test_the_run_table_shows_the_skipped_row(all_run, capsys):
    store, out = all_run
    run = store.existing_run(out["run_id"])
    config = load_resolved_config(run.config)
    rows = {r.pop("estimator"): r for r in out["rows"] if "skipped" not in r}
    summary = RunSummary(out["run_id"], str(store.root), out["mlflow_run_id"],
                         estimators=rows, accuracy=out["accuracy"])
    capsys.readouterr()
    print_run_summary(summary, config, 1.0)
    line = next(x for x in capsys.readouterr().out.splitlines() if "if_exact" in x)
    assert "skipped: if_exact builds a dense" in line
