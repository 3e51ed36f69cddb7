"""workloads.datasets: digits, splits, the samples.parquet round trip and user Parquet files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import BadInput
from workloads.datasets import (
    Samples,
    assign_splits,
    load_digits,
    load_parquet,
    read_samples,
    samples_table,
)

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


@pytest.fixture(scope="module")
def digits() -> Samples:
    return load_digits(FRACTIONS, seed=0)


def _write(tmp_path: Path, table: pa.Table, name: str = "data.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(table, path)
    return path


def _load(path: Path, **kw) -> Samples:
    args = dict(label_column="label", feature_columns=None, group_column=None,
                fractions=FRACTIONS, seed=0)
    args.update(kw)
    return load_parquet(path, **args)


def _bad(path: Path, *needles: str, **kw) -> str:
    with pytest.raises(BadInput) as info:
        _load(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---- digits and splits -------------------------------------------------------------------


def test_digits_shape_and_range(digits: Samples) -> None:
    assert digits.x.shape == (1797, 64)
    assert digits.x.dtype == np.float32
    assert digits.x.min() == 0.0 and digits.x.max() == 1.0
    assert digits.label.dtype == np.int64
    assert set(np.unique(digits.label)) == set(range(10))
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    np.testing.assert_array_equal(digits.sample_id, np.arange(1797))
    np.testing.assert_array_equal(digits.clean_label, digits.label)
    assert not digits.corrupted.any()


def test_digits_split_sizes_match_fractions(digits: Samples) -> None:
    sizes = {s: len(digits.indices(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": round(0.6 * 1797), "val": round(0.2 * 1797),
                     "test": 1797 - round(0.6 * 1797) - round(0.2 * 1797)}
    assert set(digits.split) == {"train", "val", "test"}


def test_splits_deterministic_in_seed_and_differ_across_seeds() -> None:
    fractions = {"train": 0.5, "val": 0.3, "test": 0.2}
    a = assign_splits(200, fractions, seed=7)
    b = assign_splits(200, fractions, seed=7)
    c = assign_splits(200, fractions, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    counts = {s: int((a == s).sum()) for s in ("train", "val", "test")}
    assert counts == {"train": 100, "val": 60, "test": 40}
    assert (c == "train").sum() == 100


def test_digits_splits_follow_seed(digits: Samples) -> None:
    again = load_digits(FRACTIONS, seed=0)
    other = load_digits(FRACTIONS, seed=1)
    np.testing.assert_array_equal(again.split, digits.split)
    assert (other.split != digits.split).any()


# ---- samples.parquet round trip ----------------------------------------------------------


def test_samples_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 12
    samples = Samples(
        sample_id=np.arange(100, 100 + n, dtype=np.int64),
        inputs={"features": rng.normal(size=(n, 6)).astype(np.float32)},
        label=rng.integers(0, 3, n).astype(np.int64),
        split=np.array(["train", "val", "test"] * 4),
        num_classes=3,
        input_shape=(1, 2, 3),
        clean_label=rng.integers(0, 3, n).astype(np.int64),
        corrupted=rng.random(n) < 0.5,
        group=rng.integers(0, 2, n).astype(np.int64),
    )
    path = tmp_path / "samples.parquet"
    pq.write_table(samples_table(samples), path)
    back = read_samples(path)
    np.testing.assert_array_equal(back.sample_id, samples.sample_id)
    np.testing.assert_array_equal(back.x, samples.x)
    assert back.x.dtype == np.float32
    np.testing.assert_array_equal(back.label, samples.label)
    np.testing.assert_array_equal(back.split, samples.split)
    np.testing.assert_array_equal(back.clean_label, samples.clean_label)
    np.testing.assert_array_equal(back.corrupted, samples.corrupted)
    assert back.corrupted.dtype == bool
    np.testing.assert_array_equal(back.group, samples.group)
    assert back.num_classes == 3
    assert back.input_shape == (1, 2, 3)


def test_samples_table_schema_and_unknowns_round_trip(tmp_path: Path) -> None:
    samples = Samples(
        sample_id=np.arange(4, dtype=np.int64),
        inputs={"features": np.eye(4, dtype=np.float32)},
        label=np.array([0, 1, 1, 0], dtype=np.int64),
        split=np.array(["train", "train", "val", "test"]),
        num_classes=2,
        input_shape=(4,),
    )
    table = samples_table(samples)
    schema = table.schema
    assert schema.field("sample_id").type == pa.int64()
    assert schema.field("split").type == pa.string()
    assert schema.field("label").type == pa.int64()
    assert schema.field("clean_label").type == pa.int64()
    assert schema.field("corrupted").type == pa.bool_()
    assert schema.field("group").type == pa.int64()
    assert schema.field("features").type == pa.list_(pa.float32())
    assert table["clean_label"].null_count == 4
    path = tmp_path / "samples.parquet"
    pq.write_table(table, path)
    back = read_samples(path)
    assert back.clean_label is None and back.corrupted is None and back.group is None
    assert back.input_shape == (4,)
    np.testing.assert_array_equal(back.x, samples.x)


# ---- user Parquet files ------------------------------------------------------------------


def test_parquet_separate_feature_columns(tmp_path: Path) -> None:
    path = _write(tmp_path, pa.table({
        "a": [0.5, 1.5, 2.5, 3.5, 4.5],
        "b": pa.array([1, 2, 3, 4, 5], pa.int32()),
        "label": [0, 2, 1, 2, 0],
    }))
    s = _load(path)
    assert s.x.dtype == np.float32
    np.testing.assert_array_equal(s.x, [[0.5, 1], [1.5, 2], [2.5, 3], [3.5, 4], [4.5, 5]])
    np.testing.assert_array_equal(s.label, [0, 2, 1, 2, 0])
    assert s.label.dtype == np.int64
    assert s.num_classes == 3
    assert s.input_shape == (2,)
    np.testing.assert_array_equal(s.sample_id, np.arange(5))
    assert s.clean_label is None and s.corrupted is None and s.group is None
    assert set(s.split) <= {"train", "val", "test"}


def test_parquet_feature_columns_selected(tmp_path: Path) -> None:
    path = _write(tmp_path, pa.table({"a": [1.0, 2.0], "b": [3.0, 4.0], "y": [1, 0]}))
    s = _load(path, label_column="y", feature_columns=["b"])
    np.testing.assert_array_equal(s.x, [[3.0], [4.0]])
    np.testing.assert_array_equal(s.label, [1, 0])


def test_parquet_one_list_column(tmp_path: Path) -> None:
    rows = [[float(i), float(i) + 0.5, -float(i)] for i in range(6)]
    path = _write(tmp_path, pa.table({"pixels": rows, "label": [0, 1, 0, 1, 0, 1]}))
    s = _load(path)
    assert s.x.shape == (6, 3)
    assert s.x.dtype == np.float32
    np.testing.assert_array_equal(s.x, np.asarray(rows, dtype=np.float32))
    assert s.input_shape == (3,)


def test_parquet_sample_id_group_split_kept(tmp_path: Path) -> None:
    split = ["test", "train", "val", "train", "train", "test"]
    path = _write(tmp_path, pa.table({
        "sample_id": [50, 10, 40, 20, 30, 60],
        "x1": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "g": [1, 0, 1, 0, 1, 0],
        "split": split,
        "label": [1, 0, 1, 0, 1, 0],
    }))
    s = _load(path, group_column="g")
    np.testing.assert_array_equal(s.sample_id, [50, 10, 40, 20, 30, 60])
    np.testing.assert_array_equal(s.split, split)
    np.testing.assert_array_equal(s.group, [1, 0, 1, 0, 1, 0])
    # sample_id, split and the group are not features
    np.testing.assert_array_equal(s.x, [[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    # the given split wins over the seed
    np.testing.assert_array_equal(_load(path, group_column="g", seed=99).split, split)


def test_parquet_column_named_group_is_the_group_not_a_feature(tmp_path: Path) -> None:
    path = _write(tmp_path, pa.table({"x1": [1.0, 2.0, 3.0], "group": [2, 3, 2],
                                      "label": [0, 1, 0]}))
    s = _load(path)
    assert s.x.shape == (3, 1)
    np.testing.assert_array_equal(s.group, [2, 3, 2])


def test_parquet_split_assigned_from_seed_when_absent(tmp_path: Path) -> None:
    n = 50
    path = _write(tmp_path, pa.table({"a": np.arange(n, dtype=np.float64),
                                      "label": np.arange(n) % 2}))
    a, b, c = _load(path, seed=3), _load(path, seed=3), _load(path, seed=4)
    np.testing.assert_array_equal(a.split, b.split)
    assert (a.split != c.split).any()
    assert (a.split == "train").sum() == 30 and (a.split == "val").sum() == 10


# ---- user Parquet files: BadInput --------------------------------------------------------


def test_parquet_missing_file(tmp_path: Path) -> None:
    _bad(tmp_path / "nope.parquet", "not found", "nope.parquet")


@pytest.mark.parametrize("content", [b"hello", b"a,b,label\n1,2,0\n" * 20,
                                     b"PAR1" + b"\0" * 64 + b"PAR1"])
def test_parquet_not_parquet(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.parquet"
    path.write_bytes(content)
    _bad(path, "not readable Parquet", "data.parquet")


def test_parquet_missing_label_column(tmp_path: Path) -> None:
    path = _write(tmp_path, pa.table({"a": [1.0, 2.0], "target": [0, 1]}))
    _bad(path, "no label column", "'label'")


@pytest.mark.parametrize("table", [
    pa.table({"a": [1.0, float("nan")], "label": [0, 1]}),
    pa.table({"a": pa.array([1.0, None]), "label": [0, 1]}),
    pa.table({"a": [1.0, float("inf")], "label": [0, 1]}),
    pa.table({"f": [[1.0, float("nan")], [2.0, 3.0]], "label": [0, 1]}),
], ids=["nan", "null", "inf", "nan-in-list"])
def test_parquet_nan_features(tmp_path: Path, table: pa.Table) -> None:
    _bad(_write(tmp_path, table), "NaN")


def test_parquet_float_labels(tmp_path: Path) -> None:
    path = _write(tmp_path, pa.table({"a": [1.0, 2.0], "label": [0.0, 1.0]}))
    _bad(path, "'label'", "integers")


def test_parquet_negative_labels(tmp_path: Path) -> None:
    path = _write(tmp_path, pa.table({"a": [1.0, 2.0], "label": [0, -1]}))
    _bad(path, "'label'", "negative")


def test_parquet_duplicate_sample_id(tmp_path: Path) -> None:
    path = _write(tmp_path, pa.table({"sample_id": [3, 4, 3], "a": [1.0, 2.0, 3.0],
                                      "label": [0, 1, 0]}))
    _bad(path, "sample_id", "not unique")


def test_parquet_unknown_split_value(tmp_path: Path) -> None:
    path = _write(tmp_path, pa.table({"split": ["train", "holdout"], "a": [1.0, 2.0],
                                      "label": [0, 1]}))
    msg = _bad(path, "split", "'holdout'")
    assert "np.str_" not in msg


def test_parquet_ragged_list_column(tmp_path: Path) -> None:
    path = _write(tmp_path, pa.table({"f": [[1.0, 2.0], [3.0]], "label": [0, 1]}))
    _bad(path, "'f'", "different shapes", "one shape is required")


def test_parquet_non_numeric_feature(tmp_path: Path) -> None:
    path = _write(tmp_path, pa.table({"a": [1.0, 2.0], "name": ["x", "y"], "label": [0, 1]}))
    _bad(path, "['name']", "not numeric")


def test_parquet_missing_feature_and_group_columns(tmp_path: Path) -> None:
    path = _write(tmp_path, pa.table({"a": [1.0, 2.0], "label": [0, 1]}))
    _bad(path, "lacks feature columns", "'b'", feature_columns=["a", "b"])
    _bad(path, "no group column", "'sex'", group_column="sex")


@pytest.mark.parametrize("table,needles", [
    (pa.table({"a": pa.array([], pa.float64()), "label": pa.array([], pa.int64())}),
     ("no rows",)),
    (pa.table({"label": [0, 1]}), ("no feature columns",)),
    (pa.table({"sample_id": pa.array([1, None]), "a": [1.0, 2.0], "label": [0, 1]}),
     ("'sample_id'", "integers")),
    (pa.table({"sample_id": [1.5, 2.5], "a": [1.0, 2.0], "label": [0, 1]}),
     ("'sample_id'", "integers")),
    (pa.table({"group": pa.array([1, None]), "a": [1.0, 2.0], "label": [0, 1]}),
     ("'group'", "integers")),
    (pa.table({"f": [[1.0, 2.0], None], "label": [0, 1]}), ("'f'", "null rows")),
    (pa.table({"f": [["a"], ["b"]], "label": [0, 1]}), ("'f'", "lists of numbers")),
], ids=["empty", "no-features", "null-id", "float-id", "null-group", "null-row", "strings"])
def test_parquet_other_bad_tables(tmp_path: Path, table: pa.Table, needles) -> None:
    _bad(_write(tmp_path, table), *needles)
