"""A run whose store is an S3 URL (moto's S3 server): every run file is an object in the
bucket, nothing of ``runs/`` touches the local disk, the scores equal a local-store run's bit
for bit, ``sieve query`` reads the bucket, ``--resume`` skips the complete shards, Dask worker
processes write their shards there too, and an unknown bucket is a one-line error (exit 2)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from flows.cli import main
from storage.atomic import read_parquet_table
from storage.metrics import read_metrics
from storage.store import RunPaths, Store
from tests.flows.conftest import SHARDED_RUN, sets
from tests.storage.moto_s3 import object_keys, s3_server

BUCKET, PREFIX = "sieve-test", "team/store"
URL = f"s3://{BUCKET}/{PREFIX}"
HARMFUL = "select sample_id, score from scores where estimator = 'tracin' order by score limit 5"


def _run(store: Store, *overrides: str) -> tuple[RunPaths, float]:
    started = time.perf_counter()
    assert main(["run", "--store", str(store), *sets(*SHARDED_RUN, *overrides)]) == 0
    return store.latest_run(), time.perf_counter() - started


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(local store, its run, the S3 store, its run, the local folder of URL stores)."""
    cache, cwd = tmp_path_factory.mktemp("sieve-cache"), tmp_path_factory.mktemp("cwd")
    with s3_server(BUCKET), pytest.MonkeyPatch.context() as env:
        env.setenv("SIEVE_CACHE_DIR", str(cache))
        env.chdir(cwd)
        local = Store(tmp_path_factory.mktemp("local-store"))
        local_run, local_s = _run(local)
        s3 = Store(URL)
        s3_run, s3_s = _run(s3)
        print(f"\ntiny run: local store {local_s:.1f} s, S3 store (moto) {s3_s:.1f} s")
        yield local, local_run, s3, s3_run, cache
    assert not any(cwd.iterdir()), "a URL store wrote into the current directory"


def _local_files(run: RunPaths) -> set[str]:
    return {p.relative_to(run.dir).as_posix() for p in run.dir.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def test_every_run_file_is_an_object_and_none_is_local(runs):
    _, local_run, _, s3_run, cache = runs
    run_prefix = f"{PREFIX}/runs/{s3_run.run_id}/"
    objects = {key.removeprefix(run_prefix) for key in object_keys(BUCKET, run_prefix)}
    assert objects == _local_files(local_run)
    for name in ("config.yaml", "samples.parquet", "checkpoints/index.parquet",
                 "metrics.parquet", "report.html", "mlflow_run_id"):
        assert name in objects
    assert any(o.startswith("gradients/checkpoint=1/split=train/part-") for o in objects)
    assert any(o.startswith("scores/estimator=tracin/") for o in objects)
    local_folder = cache / "s3" / BUCKET / PREFIX
    assert (local_folder / "mlflow.db").is_file()
    assert not list(cache.rglob("runs")), "part of runs/ was written to the local disk"


def test_scores_equal_a_local_store_run(runs):
    _, local_run, _, s3_run, _ = runs
    for estimator in ("ip", "tracin"):
        [local_part] = local_run.scores_root.glob(f"estimator={estimator}/target=*/part-0.parquet")
        s3_part = s3_run.scores_root / local_part.relative_to(local_run.scores_root).as_posix()
        expected, got = read_parquet_table(local_part), read_parquet_table(s3_part)
        assert np.ptp(expected["score"].to_numpy()) > 0
        assert got.equals(expected)


def test_query_and_runs_read_the_bucket(runs, capsys, monkeypatch):
    local, _, s3, s3_run, _ = runs
    capsys.readouterr()
    monkeypatch.setenv("SIEVE_STORE", URL)
    assert main(["runs"]) == 0
    assert s3_run.run_id in capsys.readouterr().out
    assert main(["query", "--store", str(s3), "--format", "json", HARMFUL]) == 0
    from_s3 = json.loads(capsys.readouterr().out)
    assert main(["query", "--store", str(local), "--format", "json", HARMFUL]) == 0
    assert from_s3 == json.loads(capsys.readouterr().out)
    assert len(from_s3) == 5 and all(row["score"] < 0 for row in from_s3)
    assert main(["query", "--store", str(s3), "select * from read_text('/etc/hostname')"]) == 2
    assert "reads only the store's runs folder" in capsys.readouterr().err


def test_resume_skips_the_complete_shards(runs):
    _, _, s3, s3_run, _ = runs
    shards = f"{PREFIX}/runs/{s3_run.run_id}/gradients/"
    before = object_keys(BUCKET, shards)
    assert main(["run", "--store", str(s3), "--resume", s3_run.run_id]) == 0
    assert object_keys(BUCKET, shards) == before  # same keys, same LastModified: none rewritten
    rows = read_metrics(s3_run.metrics).to_pylist()
    skipped = {(m["stage"], m["name"]): m["value"] for m in rows}[("gradients", "shards_skipped")]
    assert skipped == len(before)


def test_dask_workers_write_their_shards_to_the_bucket(runs):
    _, local_run, s3, _, _ = runs
    dask_run, seconds = _run(s3, "runner=dask", "dask.workers=2")
    print(f"\ntiny run on Dask (2 workers), S3 store: {seconds:.1f} s")
    for estimator in ("ip", "tracin"):
        [local_part] = local_run.scores_root.glob(f"estimator={estimator}/target=*/part-0.parquet")
        s3_part = dask_run.scores_root / local_part.relative_to(local_run.scores_root).as_posix()
        assert read_parquet_table(s3_part).equals(read_parquet_table(local_part))


def test_unknown_bucket_is_a_one_line_error(capsys):
    with s3_server():
        assert main(["runs", "--store", "s3://no-such-bucket/store"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-bucket" in err and "not reachable" in err, err
