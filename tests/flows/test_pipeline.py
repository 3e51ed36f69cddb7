"""The main flow end to end on real digits: store layout, schemas, DuckDB views, MLflow."""

from __future__ import annotations

import csv
import io

import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from flows.cli import main
from storage.checkpoints import file_sha256, read_checkpoint_index
from storage.gradient_shards import complete_shards, read_gradient_shard, read_shard_meta
from storage.metrics import read_metrics

ESTIMATORS = {"random", "loss", "ip", "cosine", "tracin", "if_exact"}
STAGES = {"train", "gradients", "score", "prune", "retrain"}


def test_scores_one_row_per_training_sample_for_every_estimator(small_run, capsys):
    store, run = small_run
    capsys.readouterr()
    sql = "select estimator, count(*) as n from scores group by 1 order by 1"
    assert main(["query", "--store", str(store.root), "--format", "csv", sql]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    samples = pq.read_table(run.samples).to_pylist()
    n_train = sum(s["split"] == "train" for s in samples)
    assert {r["estimator"] for r in rows} == ESTIMATORS
    assert all(int(r["n"]) == n_train for r in rows)


def test_samples_keep_clean_labels_and_corruption(small_run):
    _, run = small_run
    rows = pq.read_table(run.samples).to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    flipped = [r for r in train if r["corrupted"]]
    assert abs(len(flipped) / len(train) - 0.2) < 0.01
    assert all(r["label"] != r["clean_label"] for r in flipped)
    assert not any(r["corrupted"] for r in rows if r["split"] != "train")


def test_checkpoints_are_indexed_with_their_hashes(small_run):
    _, run = small_run
    records = read_checkpoint_index(run.checkpoints_dir)
    assert [r.epoch for r in records] == [2.0, 4.0, 6.0]
    assert all(r.lr > 0 for r in records)
    assert all(file_sha256(r.path) == r.sha256 for r in records)


def test_gradient_shards_cover_the_needed_splits_and_checkpoints(small_run):
    _, run = small_run
    for checkpoint in range(3):  # tracin reads every checkpoint
        for split in ("train", "val"):
            shards = complete_shards(run.gradients_dir(checkpoint, split))
            assert shards, (checkpoint, split)
            meta = read_shard_meta(shards[0])
            assert meta.checkpoint == checkpoint and meta.split == split
            assert meta.k == meta.parameter_count == len(read_gradient_shard(shards[0])[1][0])
    assert not run.gradients_dir(0, "test").exists()


def test_the_most_harmful_samples_are_mostly_corrupted(small_run, capsys):
    store, _ = small_run
    capsys.readouterr()
    sql = """select s.estimator, avg(c.corrupted::int) as hit from
             (select *, row_number() over (partition by estimator order by score) as r
              from scores) s join samples c using (sample_id)
             where r <= 100 group by 1"""
    assert main(["query", "--store", str(store.root), "--format", "json", sql]) == 0
    import json

    hit = {row["estimator"]: row["hit"] for row in json.loads(capsys.readouterr().out)}
    assert hit["if_exact"] > 0.8 and hit["ip"] > 0.8 and hit["tracin"] > 0.6
    assert hit["random"] < 0.4


def test_metrics_cover_every_stage(small_run):
    _, run = small_run
    metrics = read_metrics(run.metrics).to_pylist()
    assert {m["stage"] for m in metrics} == STAGES
    aucs = {m["estimator"]: m["value"] for m in metrics if m["name"] == "detection_auc"}
    assert set(aucs) == ESTIMATORS
    assert max(aucs.values()) > 0.9 and abs(aucs["random"] - 0.5) < 0.1
    retrain = [m for m in metrics if m["stage"] == "retrain"]
    arms = {m["estimator"] for m in retrain if m["name"] == "test_accuracy"}
    assert arms == {"full", "random", "pruned:tracin"}


def test_mlflow_holds_the_parent_with_five_stage_runs(small_run):
    store, run = small_run
    client = MlflowClient(tracking_uri=store.mlflow_uri)
    parent_id = (run.dir / "mlflow_run_id").read_text().strip()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sieve.run_id"] == run.run_id
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == STAGES
    for child in children:
        assert child.data.metrics, child.info.run_name
        assert child.info.status == "FINISHED"
    assert len(client.get_metric_history(by_name["train"].info.run_id, "loss")) > 100
    assert "detection_auc.if_exact" in by_name["score"].data.metrics
    artifacts = {
        name: {a.path for a in client.list_artifacts(by_name[name].info.run_id)}
        for name in ("score", "retrain")
    }
    assert "score_distributions.png" in artifacts["score"]
    assert "accuracy.png" in artifacts["retrain"]
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent_id)}


def test_runs_lists_the_run(small_run, capsys):
    store, run = small_run
    capsys.readouterr()
    assert main(["runs", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert run.run_id in out and "retrain" in out
