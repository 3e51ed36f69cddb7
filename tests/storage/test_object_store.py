"""The store's files through an S3 URL (moto's S3 server): atomic writes that never leave a
partial object, Parquet / gradient shard / checkpoint / metrics round trips, the DuckDB views
and their sandbox, run listing, and what stays local (MLflow's database, locks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from storage.atomic import (
    atomic_path,
    read_parquet_schema,
    read_parquet_table,
    write_parquet_atomic,
)
from storage.checkpoints import (
    CheckpointRecord,
    load_state_dict,
    read_checkpoint_index,
    save_checkpoint,
    verify_checkpoints,
    write_checkpoint_index,
)
from storage.errors import BadInput
from storage.gradient_shards import (
    ShardMeta,
    complete_shards,
    iter_gradient_blocks,
    read_gradient_shard,
    read_shard_meta,
    shard_path,
    write_gradient_shard,
)
from storage.location import is_remote, lock_file, store_path
from storage.metrics import read_metrics, record_metrics
from storage.store import Store
from storage.views import open_run, run_query
from tests.storage.moto_s3 import object_keys, s3_server

BUCKET = "store-bucket"


@pytest.fixture(scope="module")
def endpoint():
    with s3_server(BUCKET) as url:
        yield url


@pytest.fixture
def store(endpoint, request, tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("SIEVE_CACHE_DIR", str(tmp_path / "cache"))
    return Store(f"s3://{BUCKET}/{request.node.name}")


def _keys(store: Store) -> set[str]:
    prefix = store.root.path.split("/", 1)[1] + "/"
    return {k.removeprefix(prefix) for k in object_keys(BUCKET, prefix)}


def test_paths_are_urls_and_local_paths_stay_plain(store, tmp_path):
    assert is_remote(store.root) and str(store) == f"s3://{store.root.path}"
    assert str(store.run("r1").scores_dir("ip", "val")).startswith(f"{store}/runs/r1/scores/")
    local = Store(tmp_path / "x" / ".." / "local")
    assert type(local.root) is type(Path()) and local.root == (tmp_path / "local").resolve()
    assert local.local_dir == local.root and local.mlflow_uri.endswith("/local/mlflow.db")
    file_url = store_path("file:///tmp/a")
    assert type(file_url) is type(Path()) and file_url == Path("/tmp/a")
    assert store.local_dir == tmp_path / "cache" / "s3" / BUCKET / store.root.path.split("/")[1]
    assert store.mlflow_uri == f"sqlite:///{store.local_dir.as_posix()}/mlflow.db"
    assert not is_remote(lock_file(store.root / "runs" / "r1" / "metrics.parquet"))
    with pytest.raises(BadInput, match="cannot open store URL"):
        Store("nosuchprotocol://bucket/store")


def test_atomic_write_is_one_complete_object_or_none(store):
    path = store.root / "runs" / "r1" / "t.parquet"
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("writer died")
    assert not path.exists() and _keys(store) == set()
    table = pa.table({"sample_id": [1, 2, 3], "score": [0.5, -1.0, 2.0]})
    write_parquet_atomic(table, path)
    assert _keys(store) == {"runs/r1/t.parquet"}  # no temporary object, ever
    assert read_parquet_table(path).equals(table)
    assert read_parquet_schema(path).names == ["sample_id", "score"]


def test_gradient_shards_round_trip(store):
    folder = store.run("r1").gradients_dir(0, "train")
    meta = ShardMeta("float32", None, 5, None, ["w"], 5, 0, "h", "train")
    grads = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    for part in (1, 0):
        write_gradient_shard(shard_path(folder, part), np.arange(40) + 40 * part, grads, meta)
    shards = complete_shards(folder)
    assert [p.name for p in shards] == ["part-0.parquet", "part-1.parquet"]
    ids, back = read_gradient_shard(shards[1])
    np.testing.assert_array_equal(ids, np.arange(40, 80))
    assert torch.equal(back, grads) and read_shard_meta(shards[0]) == meta
    blocks = list(iter_gradient_blocks(shards[0]))
    assert torch.equal(torch.cat([g.clone() for _, g in blocks]), grads)


def test_checkpoints_and_index_round_trip(store):
    folder = store.run("r1").checkpoints_dir
    state = torch.nn.Linear(3, 2).state_dict()
    path, sha = save_checkpoint(folder, 7, state)
    assert str(path) == f"{folder}/step-7.pt"
    write_checkpoint_index(folder, [CheckpointRecord(0, 7, 1.0, 0.1, str(path), sha)])
    assert read_parquet_table(folder / "index.parquet")["path"].to_pylist() == ["step-7.pt"]
    [record] = read_checkpoint_index(folder)
    assert record.path == str(path)
    verify_checkpoints([record])
    loaded = load_state_dict(record.path, record.sha256)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(BadInput, match="does not match its recorded sha256"):
        load_state_dict(record.path, "0" * 64)


def test_metrics_rows_are_replaced_per_stage(store):
    path = store.run("r1").metrics
    assert read_metrics(path).num_rows == 0
    record_metrics(path, "train", [{"name": "acc", "value": 0.5}])
    record_metrics(path, "score", [{"name": "auc", "value": 0.7, "estimator": "ip"}])
    record_metrics(path, "train", [{"name": "acc", "value": 0.9}])
    rows = {(r["stage"], r["name"]): r["value"] for r in read_metrics(path).to_pylist()}
    assert rows == {("train", "acc"): 0.9, ("score", "auc"): 0.7}
    assert _keys(store) == {"runs/r1/metrics.parquet"}


def test_views_read_the_bucket_and_stay_sandboxed(store, endpoint):
    run = store.run("r1")
    write_parquet_atomic(pa.table({"sample_id": [0, 1], "score": [0.5, -2.0]}),
                         run.scores_dir("tracin", "val") / "part-0.parquet")
    other = Store(f"s3://{BUCKET}/elsewhere").run("r9")
    write_parquet_atomic(pa.table({"secret": [1]}), other.samples)
    with open_run(run) as con:
        assert run_query(con, "select sample_id, score from scores order by score") == (
            ["sample_id", "score"], [(1, -2.0), (0, 0.5)])
        assert run_query(con, "select count(*) from samples")[1] == [(0,)]
        for outside in (f"{other.samples}", "/etc/hostname"):
            with pytest.raises(BadInput, match="reads only the store's runs folder"):
                run_query(con, f"select * from read_parquet('{outside}')")


def test_runs_are_listed_from_the_bucket(store):
    assert store.list_runs() == []
    for run_id in ("20260101-000000-aaaaaa", "mine", "20250101-000000-bbbbbb"):
        (store.run(run_id).config).write_text("seed: 0\n")
    assert [r.run_id for r in store.list_runs()] == [
        "20250101-000000-bbbbbb", "20260101-000000-aaaaaa", "mine"]
    assert store.existing_run("mine").dir == store.run("mine").dir
    with pytest.raises(BadInput, match=f"no run gone in {store}"):
        store.existing_run("gone")


def test_an_unknown_bucket_is_unreachable(endpoint):
    Store(f"s3://{BUCKET}/any/prefix").check_reachable()
    with pytest.raises(BadInput, match="store s3://missing-bucket/x is not reachable"):
        Store("s3://missing-bucket/x").check_reachable()


def test_attributions_are_replaced_whole_in_a_bucket(store):
    from tasks.attributions import write_attributions

    folder = store.run("r1").attributions_dir("ip")
    train, test = np.arange(6), np.arange(100, 102)
    matrix = np.arange(12, dtype=np.float64).reshape(6, 2)
    assert write_attributions(folder, train, test, matrix, part_rows=4, block=2) == 3
    assert write_attributions(folder, train[:2], test, -matrix[:2], part_rows=4, block=2) == 1
    assert _keys(store) == {"runs/r1/attributions/estimator=ip/part-0.parquet"}
    assert read_parquet_table(folder / "part-0.parquet")["score"].to_pylist() == [0, -1, -2, -3]


def test_a_store_that_went_away_is_not_a_missing_checkpoint(tmp_path, monkeypatch):
    """fsspec's is_file() answers False when the store does not answer: a checkpoint read
    must not call the file missing then, but raise the store's own failure (which the CLI
    reports as "store ... is not reachable"); a truly missing file is still BadInput."""
    from storage.location import store_failure
    from tests.storage.moto_s3 import RUNNING

    monkeypatch.setenv("SIEVE_CACHE_DIR", str(tmp_path / "cache"))
    with s3_server("gone-bucket"):
        folder = Store("s3://gone-bucket/s").run("r1").checkpoints_dir
        path, sha = save_checkpoint(folder, 1, torch.nn.Linear(2, 2).state_dict())
        with pytest.raises(BadInput, match="does not exist"):
            load_state_dict(f"{folder}/step-2.pt")
        server = RUNNING[-1]
        server.stop()
        server._server.server_close()
        with pytest.raises(Exception) as caught:  # noqa: B017 - botocore/aiohttp, no common base
            load_state_dict(path, sha)
        assert not isinstance(caught.value, BadInput)
        assert store_failure(caught.value) is not None, repr(caught.value)
