import os
import re
from pathlib import Path

import pytest

from storage.errors import BadInput
from storage.store import RunPaths, Store


def test_root_is_absolute_and_derived_locations(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = Store("rel-store")
    assert store.root == tmp_path.resolve() / "rel-store"
    assert store.runs_dir == store.root / "runs"
    assert store.mlflow_uri == f"sqlite:///{store.root}/mlflow.db"
    assert store.artifact_root == store.root / "mlartifacts"


def test_default_uses_env_then_local_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SIEVE_STORE", raising=False)
    assert Store.default().root == tmp_path.resolve() / "sieve-store"
    monkeypatch.setenv("SIEVE_STORE", str(tmp_path / "elsewhere"))
    assert Store.default().root == (tmp_path / "elsewhere").resolve()


def test_new_run_id_format_and_uniqueness() -> None:
    ids = {Store.new_run_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", i) for i in ids)


def test_run_paths_layout(tmp_path: Path) -> None:
    run = Store(tmp_path).run("r1")
    d = tmp_path.resolve() / "runs" / "r1"
    assert run == RunPaths("r1", d)
    assert run.config == d / "config.yaml"
    assert run.samples == d / "samples.parquet"
    assert run.checkpoints_dir == d / "checkpoints"
    assert run.checkpoint_index == d / "checkpoints" / "index.parquet"
    assert run.metrics == d / "metrics.parquet"
    assert run.gradients_dir(3, "train") == d / "gradients" / "checkpoint=3" / "split=train"
    assert run.scores_dir("tracin", "val") == d / "scores" / "estimator=tracin" / "target=val"
    assert run.attributions_dir("trak") == d / "attributions" / "estimator=trak"
    assert not d.exists()  # run() does not create anything


@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "", "..", ".hidden", "a..b", "-x", "a b", "x" * 65, "a\\b", "é"]
)
def test_unsafe_run_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(BadInput, match="invalid run id"):
        Store(tmp_path).run(bad)


@pytest.mark.parametrize("good", ["a", "A.b_c-1", "x" * 64, "20260101-000000-abcdef"])
def test_safe_run_ids_are_accepted(tmp_path: Path, good: str) -> None:
    assert Store(tmp_path).run(good).run_id == good


def test_partition_names_are_checked(tmp_path: Path) -> None:
    run = Store(tmp_path).run("r")
    with pytest.raises(BadInput, match="estimator"):
        run.scores_dir("../evil", "val")
    with pytest.raises(BadInput, match="target"):
        run.scores_dir("ip", "a=b")
    with pytest.raises(BadInput, match="split"):
        run.gradients_dir(0, "x/y")
    with pytest.raises(ValueError):
        run.gradients_dir(-1, "train")


def test_existing_run(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(BadInput, match=f"no run nope in {re.escape(str(store.root))}"):
        store.existing_run("nope")
    store.run("yes").dir.mkdir(parents=True)
    assert store.existing_run("yes").dir.is_dir()


def test_list_and_latest_runs_oldest_first(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.list_runs() == []
    with pytest.raises(BadInput, match="no runs"):
        store.latest_run()
    names = ["20260102-000000-aaaaaa", "20250101-120000-ffffff", "20260102-000000-000001"]
    for name in names:
        store.run(name).dir.mkdir(parents=True)
    custom = store.run("my-run").dir
    custom.mkdir()
    os.utime(custom, (1_600_000_000, 1_600_000_000))  # 2020: older than every generated id
    (store.runs_dir / ".tmp-junk").mkdir()  # not a run name: ignored
    (store.runs_dir / "file.txt").write_text("not a run")
    assert [r.run_id for r in store.list_runs()] == [
        "my-run",
        "20250101-120000-ffffff",
        "20260102-000000-000001",
        "20260102-000000-aaaaaa",
    ]
    assert store.latest_run().run_id == "20260102-000000-aaaaaa"
    newest = store.run(Store.new_run_id())
    newest.dir.mkdir()
    assert store.latest_run() == newest
