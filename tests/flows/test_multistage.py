"""`sieve run -c configs/multistage.yaml`, made small: a real Prefect flow that pretrains on
digits 0-4, finetunes on 5-9, scores the pretraining samples, prunes, re-pretrains and
re-finetunes, and validates the scores against leave-one-out refits; MLflow, DuckDB, Parquet."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from storage.metrics import read_metrics
from storage.store import RunPaths, Store
from storage.views import open_run

CONFIG = str(resources.files("configs").joinpath("multistage.yaml"))
SMALL = ["prune.seeds=2", "multistage.validation.samples=12", "multistage.hidden=8"]


def _files(root):
    return sorted(root.rglob("*")) if root.exists() else []


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def multistage_run(tmp_path_factory) -> tuple[Store, RunPaths, str]:
    store = Store(tmp_path_factory.mktemp("multistage-store"))
    assert main(["run", "--store", str(store.root), "-c", CONFIG, *sets(*SMALL)]) == 0
    return store, store.latest_run()


def test_scores_every_pretraining_sample_and_sieve_query_reads_them(multistage_run, capsys):
    store, run = multistage_run
    with open_run(run) as con:
        pretraining = con.sql("select count(*) from samples where task = 'pretrain' "
                              "and split = 'train'").fetchall()[0][0]
        counts = dict(con.sql("select estimator, count(*) from scores "
                              "where target = 'val_loss' group by 1").fetchall())
        foreign = con.sql("select count(*) from scores join samples using (sample_id) "
                          "where task <> 'pretrain' or split <> 'train'").fetchall()[0][0]
    assert counts == {"multistage": pretraining, "pretrain_loss": pretraining}
    assert foreign == 0
    capsys.readouterr()
    assert main(["query", "--store", str(store.root), "--run", run.run_id, "--format", "json",
                 "select count(*) as n from scores where estimator = 'multistage' "
                 "and score < 0"]) == 0
    harmful = json.loads(capsys.readouterr().out)[0]["n"]
    assert 0 < harmful < pretraining


def test_every_stage_is_an_mlflow_child_run(multistage_run):
    store, run = multistage_run
    client = MlflowClient(tracking_uri=store.mlflow_uri)
    parent = client.get_run((run.dir / "mlflow_run_id").read_text().strip())
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    stages = {c.data.tags["sieve.stage"]: c for c in children}
    assert set(stages) == {"pretrain", "finetune", "score", "prune", "retrain", "validate"}
    assert all(c.info.status == "FINISHED" for c in children)
    assert stages["validate"].data.metrics["loo_pearson.multistage"] >= 0.5
    assert {m["stage"] for m in read_metrics(run.metrics).to_pylist()} == set(stages)


def test_scores_predict_leave_one_out_better_than_the_pretraining_loss(multistage_run):
    _, run = multistage_run
    with open_run(run) as con:
        pearson = dict(con.sql("select estimator, value from evaluation "
                               "where metric = 'loo_pearson'").fetchall())
    assert pearson["multistage"] >= 0.5
    assert pearson["multistage"] > pearson["pretrain_loss"]


def test_pruning_the_most_harmful_beats_random_removal(multistage_run):
    _, run = multistage_run
    rows = [r for r in read_metrics(run.metrics).to_pylist()
            if r["stage"] == "retrain" and r["name"] == "test_loss"]
    loss = {arm: np.mean([r["value"] for r in rows if r["estimator"] == arm])
            for arm in {r["estimator"] for r in rows}}
    assert {r["seed"] for r in rows} == {0, 1}
    assert loss["pruned:multistage"] < loss["random"]
    assert loss["pruned:multistage"] < loss["full"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "-c", CONFIG, "--set", "multistage.finetune_classes=[4,5]"], "must not overlap"),
        (["run", "-c", CONFIG, "--set", "multistage.finetune_classes=[10,11]"], "no samples"),
        (["run", "-c", CONFIG, "--set", "multistage.validation.samples=2"], "at least 3"),
        (["evaluate", "-c", CONFIG], "sieve run"),
    ],
)
def test_bad_multistage_input_exits_2_before_writing(args, expected, tmp_path, capsys):
    store = tmp_path / "store"
    assert main([args[0], "--store", str(store), *args[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert _files(store) == []
