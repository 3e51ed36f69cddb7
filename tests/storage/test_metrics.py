import math
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from storage.errors import BadInput
from storage.metrics import read_metrics, record_metrics


def _rows(path: Path) -> list[dict]:
    return read_metrics(path).to_pylist()


def test_schema_and_optional_columns(tmp_path: Path) -> None:
    path = tmp_path / "metrics.parquet"
    record_metrics(
        path,
        "train",
        [
            {"name": "loss", "value": 0.5, "step": 10},
            {"name": "acc", "value": 1, "estimator": "ip", "seed": 3},
        ],
    )
    table = read_metrics(path)
    assert table.schema == pa.schema(
        [
            ("stage", pa.string()),
            ("name", pa.string()),
            ("value", pa.float64()),
            ("estimator", pa.string()),
            ("seed", pa.int64()),
            ("step", pa.int64()),
        ]
    )
    assert table.to_pylist() == [
        {
            "stage": "train",
            "name": "loss",
            "value": 0.5,
            "estimator": None,
            "seed": None,
            "step": 10,
        },
        {"stage": "train", "name": "acc", "value": 1.0, "estimator": "ip", "seed": 3, "step": None},
    ]


def test_rerun_replaces_its_stage_and_keeps_others(tmp_path: Path) -> None:
    path = tmp_path / "metrics.parquet"
    record_metrics(path, "train", [{"name": "loss", "value": 1.0}])
    record_metrics(
        path,
        "score",
        [
            {"name": "auc", "value": 0.7, "estimator": "a"},
            {"name": "auc", "value": 0.8, "estimator": "b"},
        ],
    )
    record_metrics(path, "train", [{"name": "loss", "value": 2.0}, {"name": "acc", "value": 0.9}])
    rows = [(r["stage"], r["name"], r["value"]) for r in _rows(path)]
    assert rows == [
        ("score", "auc", 0.7),
        ("score", "auc", 0.8),
        ("train", "loss", 2.0),
        ("train", "acc", 0.9),
    ]
    record_metrics(path, "score", [])
    assert [r["stage"] for r in _rows(path)] == ["train", "train"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "metrics.parquet"
    ]


def test_nan_values_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    record_metrics(path, "s", [{"name": "x", "value": float("nan")}])
    assert math.isnan(_rows(path)[0]["value"])


def test_bad_rows_are_programming_errors(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    record_metrics(path, "s", [{"name": "x", "value": 1.0}])
    for bad in ({"name": "x"}, {"value": 1.0}, {"name": "x", "value": 1, "stpe": 3}):
        with pytest.raises(ValueError):
            record_metrics(path, "s", [bad])
    assert _rows(path)[0]["value"] == 1.0  # the file was not touched


def test_missing_file_reads_empty_and_garbage_is_bad_input(tmp_path: Path) -> None:
    assert read_metrics(tmp_path / "none.parquet").num_rows == 0
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    with pytest.raises(BadInput, match="unreadable metrics file"):
        read_metrics(tmp_path / "bad.parquet")


def test_concurrent_threads_lose_no_stage(tmp_path: Path) -> None:
    path = tmp_path / "metrics.parquet"
    stages = [f"stage{i}" for i in range(24)]
    barrier = threading.Barrier(len(stages))

    def work(stage: str) -> None:
        barrier.wait()
        for step in range(3):
            record_metrics(path, stage, [{"name": "v", "value": step, "step": step}])

    threads = [threading.Thread(target=work, args=(s,)) for s in stages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = _rows(path)
    assert sorted(r["stage"] for r in rows) == sorted(stages)
    assert {r["step"] for r in rows} == {2}
