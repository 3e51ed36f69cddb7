"""Datasets: the digits images shipped with scikit-learn, or a user's Parquet file.

Every dataset becomes the same in-memory form, ``Samples``: flat float32 feature rows, int64
labels (as trained on), a split per sample, and the optional clean label, corruption flag and
protected group. ``samples_table`` turns it into the store's samples.parquet schema (features in
a ``features`` list<float32> column, so any worker can rebuild the data from the store alone).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import read_parquet_table
from storage.errors import BadInput

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Samples:
    """n samples. x: (n, f) float32; label, clean_label: (n,) int64; split: (n,) str;
    corrupted: (n,) bool or None; group: (n,) int64 or None; input_shape: shape of one x row
    before flattening (e.g. (1, 8, 8) for digits)."""

    sample_id: np.ndarray
    x: np.ndarray
    label: np.ndarray
    split: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    clean_label: np.ndarray | None = None
    corrupted: np.ndarray | None = None
    group: np.ndarray | None = None

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def with_labels(self, label: np.ndarray, clean_label: np.ndarray, corrupted: np.ndarray):
        return replace(self, label=label, clean_label=clean_label, corrupted=corrupted)


def assign_splits(n: int, fractions: dict[str, float], seed: int) -> np.ndarray:
    """A seeded random split of n samples into train/val/test with the given fractions."""
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions["train"] * n))
    n_val = int(round(fractions["val"] * n))
    split = np.empty(n, dtype=object)
    split[order[:n_train]] = "train"
    split[order[n_train : n_train + n_val]] = "val"
    split[order[n_train + n_val :]] = "test"
    return split.astype(str)


def load_digits(fractions: dict[str, float], seed: int) -> Samples:
    """scikit-learn's 1,797 8x8 digit images, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    label = bunch.target.astype(np.int64)
    return Samples(
        sample_id=np.arange(len(label), dtype=np.int64),
        x=x,
        label=label,
        split=assign_splits(len(label), fractions, seed),
        num_classes=10,
        input_shape=(1, 8, 8),
        clean_label=label.copy(),
        corrupted=np.zeros(len(label), dtype=bool),
    )


def load_parquet(
    path: str | Path,
    *,
    label_column: str,
    feature_columns: list[str] | None,
    group_column: str | None,
    fractions: dict[str, float],
    seed: int,
) -> Samples:
    """A user's table: feature columns (or one list column), a label, optional ``group``
    (``group_column``, else a column named ``group``), ``sample_id`` and ``split`` columns kept
    as given. Labels must be 0..C-1."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"data file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInput(f"data file {path} is not readable Parquet: {first}") from None
    columns = set(table.column_names)
    if label_column not in columns:
        raise BadInput(f"data file {path} has no label column {label_column!r}")
    if table.num_rows == 0:
        raise BadInput(f"data file {path} has no rows")
    if group_column is None and "group" in columns:
        group_column = "group"
    reserved = {label_column, "sample_id", "split", group_column}
    features = feature_columns or [c for c in table.column_names if c not in reserved]
    missing = [c for c in features if c not in columns]
    if missing:
        raise BadInput(f"data file {path} lacks feature columns {missing}")
    if not features:
        raise BadInput(f"data file {path} has no feature columns")
    x = _feature_matrix(table, features, path)
    label = table[label_column].to_numpy(zero_copy_only=False)
    if not np.issubdtype(label.dtype, np.integer):
        raise BadInput(f"label column {label_column!r} in {path} must hold integers")
    label = label.astype(np.int64)
    if label.min() < 0:
        raise BadInput(f"label column {label_column!r} in {path} has negative labels")
    n = len(label)
    sample_id = (
        _int_column(table, "sample_id", path)
        if "sample_id" in columns
        else np.arange(n, dtype=np.int64)
    )
    if len(np.unique(sample_id)) != n:
        raise BadInput(f"sample_id in {path} is not unique")
    if "split" in columns:
        split = np.asarray(table["split"].to_pylist(), dtype=str)
        unknown = set(split) - set(SPLITS)
        if unknown:
            raise BadInput(
                f"split column in {path} has values {sorted(map(str, unknown))}; use {SPLITS}"
            )
    else:
        split = assign_splits(n, fractions, seed)
    group = None
    if group_column:
        if group_column not in columns:
            raise BadInput(f"data file {path} has no group column {group_column!r}")
        group = _int_column(table, group_column, path)
    return Samples(
        sample_id=sample_id,
        x=x,
        label=label,
        split=split,
        num_classes=int(label.max()) + 1,
        input_shape=(x.shape[1],),
        clean_label=None,
        corrupted=None,
        group=group,
    )


def _int_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    col = table[name]
    if not pa.types.is_integer(col.type) or col.null_count:
        raise BadInput(f"column {name!r} in {path} must hold integers without nulls")
    return col.to_numpy().astype(np.int64)


def _feature_matrix(table: pa.Table, features: list[str], path: Path) -> np.ndarray:
    if len(features) == 1 and pa.types.is_list(table.schema.field(features[0]).type):
        rows = table[features[0]].to_pylist()
        if any(r is None for r in rows):
            raise BadInput(f"list column {features[0]!r} in {path} has null rows")
        if len({len(r) for r in rows}) != 1:
            raise BadInput(f"list column {features[0]!r} in {path} has rows of different lengths")
        try:
            x = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError):
            x = None
        if x is None or x.ndim != 2:
            raise BadInput(f"list column {features[0]!r} in {path} must hold lists of numbers")
    else:
        bad = [c for c in features if not pa.types.is_integer(table.schema.field(c).type)
               and not pa.types.is_floating(table.schema.field(c).type)
               and not pa.types.is_boolean(table.schema.field(c).type)]
        if bad:
            raise BadInput(f"feature columns {bad} in {path} are not numeric")
        x = np.column_stack([table[c].to_numpy(zero_copy_only=False) for c in features])
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise BadInput(f"features in {path} contain NaN or infinite values")
    return x


def samples_table(samples: Samples) -> pa.Table:
    """The store's samples.parquet: sample_id, split, label, clean_label, corrupted, group,
    features (list<float32>)."""
    n = len(samples.label)
    flat = pa.array(samples.x.reshape(-1), type=pa.float32())
    features = pa.FixedSizeListArray.from_arrays(flat, samples.x.shape[1]).cast(
        pa.list_(pa.float32())
    )
    def nullable(values, typ):
        return pa.array(values, type=typ) if values is not None else pa.nulls(n, type=typ)

    table = pa.table(
        {
            "sample_id": pa.array(samples.sample_id, type=pa.int64()),
            "split": pa.array(samples.split, type=pa.string()),
            "label": pa.array(samples.label, type=pa.int64()),
            "clean_label": nullable(samples.clean_label, pa.int64()),
            "corrupted": nullable(samples.corrupted, pa.bool_()),
            "group": nullable(samples.group, pa.int64()),
            "features": features,
        }
    )
    meta = {b"num_classes": str(samples.num_classes).encode(),
            b"input_shape": ",".join(map(str, samples.input_shape)).encode()}
    return table.replace_schema_metadata(meta)


def read_samples(path: Path) -> Samples:
    """Rebuild ``Samples`` from a samples.parquet written by ``samples_table`` (local or a URL)."""
    table = read_parquet_table(path)
    meta = table.schema.metadata or {}
    n = table.num_rows
    feats = table["features"].combine_chunks()
    width = len(feats[0]) if n else 0
    x = feats.flatten().to_numpy().astype(np.float32).reshape(n, width)

    def optional(name: str, dtype) -> np.ndarray | None:
        col = table[name]
        return None if col.null_count == n else col.to_numpy(zero_copy_only=False).astype(dtype)

    return Samples(
        sample_id=np.array(table["sample_id"].to_numpy()),
        x=x,
        label=np.array(table["label"].to_numpy()),
        split=np.asarray(table["split"].to_pylist(), dtype=str),
        num_classes=int(meta[b"num_classes"]),
        input_shape=tuple(int(v) for v in meta[b"input_shape"].decode().split(",")),
        clean_label=optional("clean_label", np.int64),
        corrupted=optional("corrupted", bool),
        group=optional("group", np.int64),
    )
