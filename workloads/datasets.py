"""Datasets: the digits images shipped with scikit-learn, or a user's Parquet file.

Every dataset becomes the same in-memory form, ``Samples``: one or more named input columns
(``workloads.inputs``: float32 feature rows or images, int64 token ids), int64 labels (as
trained on), a split per sample, and the optional clean label, corruption flag and protected
group. ``samples_table`` turns it into the store's samples.parquet schema (one flat list column
per input, its row shape in the schema metadata), so any worker can rebuild the data from the
store alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.atomic import read_parquet_table
from storage.errors import BadInput

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Samples:
    """n samples. inputs: input column name -> (n, *shape) array (float32 features or images,
    int64 token ids/masks; ``workloads.inputs``); label, clean_label: (n,) int64; split: (n,)
    str; corrupted: (n,) bool or None; group: (n,) int64 or None; input_shape: the shape one
    sample of the first input column is shown in (e.g. (1, 8, 8) for the flat digits rows);
    annotations: column name -> (n,) numbers or strings kept in the samples table for analysis,
    never fed to the model (e.g. a tweet's annotator confidence and text)."""

    sample_id: np.ndarray
    inputs: dict[str, np.ndarray]
    label: np.ndarray
    split: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    clean_label: np.ndarray | None = None
    corrupted: np.ndarray | None = None
    group: np.ndarray | None = None
    annotations: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def x(self) -> np.ndarray:
        """The one input column (workloads with flat features); BadInput when there are several."""
        if len(self.inputs) != 1:
            raise BadInput("this workload needs one input column; the data has "
                           f"{list(self.inputs)}")
        return next(iter(self.inputs.values()))

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one row of each input column, as the model receives it."""
        return {name: tuple(col.shape[1:]) for name, col in self.inputs.items()}

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
        inputs={"features": x},
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
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Samples:
    """A user's table: feature columns, a label, optional ``group`` (``group_column``, else a
    column named ``group``), ``sample_id`` and ``split`` columns kept as given. Labels must be
    0..C-1. Scalar numeric feature columns form one input column ``features`` (n, f); each list
    column (``list``/``fixed_size_list``, nested for 2-D/3-D) is an input column of its own, of
    the shape of its rows, or flat and reshaped to ``shapes[name]`` (given, else the JSON
    ``shapes`` entry of the schema metadata). Floats become float32, integers int64."""
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
    lists = [c for c in features if _is_list(table.schema.field(c).type)]
    stray = sorted(set(shapes or {}) - set(lists))
    if stray:
        raise BadInput(f"data.shapes names {stray}, not list columns of {path}")
    inputs = _input_columns(table, features, path, {**_metadata_shapes(table), **(shapes or {})})
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
        inputs=inputs,
        label=label,
        split=split,
        num_classes=int(label.max()) + 1,
        input_shape=next(iter(inputs.values())).shape[1:],
        clean_label=None,
        corrupted=None,
        group=group,
    )


def _int_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    col = table[name]
    if not pa.types.is_integer(col.type) or col.null_count:
        raise BadInput(f"column {name!r} in {path} must hold integers without nulls")
    return col.to_numpy().astype(np.int64)


def _metadata_shapes(table: pa.Table) -> dict[str, tuple[int, ...]]:
    raw = (table.schema.metadata or {}).get(b"shapes")
    if raw is None:
        return {}
    try:
        return {str(k): tuple(int(d) for d in v) for k, v in json.loads(raw).items()}
    except (ValueError, TypeError, AttributeError):
        raise BadInput("the schema metadata 'shapes' must be JSON {column: [dims]}") from None


def _input_columns(
    table: pa.Table, features: list[str], path: Path, shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """List columns each as an input of their own; scalar columns stacked as ``features``."""
    lists = [c for c in features if _is_list(table.schema.field(c).type)]
    scalars = [c for c in features if c not in lists]
    inputs = {c: _list_input(table[c].combine_chunks(), c, path, shapes.get(c)) for c in lists}
    if scalars:
        if "features" in inputs:
            raise BadInput(f"data file {path}: a list column named 'features' can't be used "
                           "beside scalar feature columns (they form the input 'features')")
        inputs = {"features": _scalar_matrix(table, scalars, path), **inputs}
    return inputs


def _is_list(typ: pa.DataType) -> bool:
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def _scalar_matrix(table: pa.Table, features: list[str], path: Path) -> np.ndarray:
    bad = [c for c in features if not _is_number(table.schema.field(c).type)]
    if bad:
        raise BadInput(f"feature columns {bad} in {path} are not numeric")
    x = np.column_stack([table[c].to_numpy(zero_copy_only=False) for c in features])
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise BadInput(f"features in {path} contain NaN or infinite values")
    return x


def _is_number(typ: pa.DataType) -> bool:
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)


def _list_input(
    column: pa.Array, name: str, path: Path, shape: tuple[int, ...] | None
) -> np.ndarray:
    """One list column as (n, *row shape): float32 for floats and booleans, int64 for integers.
    Every row must have one shape, except a 1-D integer column (token ids, masks), whose rows
    are padded with 0 to the longest."""
    n, dims, values = len(column), [], column
    while _is_list(values.type):
        if values.null_count:
            raise BadInput(f"list column {name!r} in {path} has null rows")
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        inner = values.flatten()
        if len(lengths) and lengths.min() != lengths.max():
            if not dims and pa.types.is_integer(inner.type):
                return _padded_tokens(values, lengths, name, path)
            raise BadInput(
                f"input column {name!r} in {path} has rows of different shapes (lengths "
                f"{int(lengths.min())} to {int(lengths.max())} at depth {len(dims) + 1}); "
                "one shape is required")
        dims.append(int(lengths[0]) if len(lengths) else 0)
        values = inner
    if not _is_number(values.type) or values.null_count:
        raise BadInput(f"list column {name!r} in {path} must hold lists of numbers")
    flat = values.to_numpy(zero_copy_only=False)
    flat = flat.astype(np.int64 if pa.types.is_integer(values.type) else np.float32)
    if np.issubdtype(flat.dtype, np.floating) and not np.isfinite(flat).all():
        raise BadInput(f"features in {path} contain NaN or infinite values")
    if shape is not None:
        if len(dims) != 1 or int(np.prod(shape)) != dims[0]:
            raise BadInput(f"input column {name!r} in {path}: rows of shape {tuple(dims)} "
                           f"can't be read as shape {tuple(shape)}")
        dims = list(shape)
    return flat.reshape(n, *dims)


def _padded_tokens(values: pa.Array, lengths: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Rows of an integer list column of different lengths, padded with 0 to the longest."""
    inner = values.flatten()
    if inner.null_count:
        raise BadInput(f"list column {name!r} in {path} must hold lists of numbers")
    flat = inner.to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.zeros((len(lengths), int(lengths.max())), dtype=np.int64)
    out[np.arange(out.shape[1]) < lengths[:, None]] = flat
    return out


def samples_table(samples: Samples) -> pa.Table:
    """The store's samples.parquet: sample_id, split, label, clean_label, corrupted, group, one
    flat list column per input (list<float32> or list<int64>, named as the input) and one column
    per annotation; the schema metadata holds num_classes, input_shape, ``inputs`` (JSON name ->
    row shape) and ``annotations`` (JSON list of names)."""
    n = len(samples.label)

    def nullable(values, typ):
        return pa.array(values, type=typ) if values is not None else pa.nulls(n, type=typ)

    columns = {
        "sample_id": pa.array(samples.sample_id, type=pa.int64()),
        "split": pa.array(samples.split, type=pa.string()),
        "label": pa.array(samples.label, type=pa.int64()),
        "clean_label": nullable(samples.clean_label, pa.int64()),
        "corrupted": nullable(samples.corrupted, pa.bool_()),
        "group": nullable(samples.group, pa.int64()),
    }
    clash = sorted((set(samples.inputs) | set(samples.annotations)) & set(columns))
    if clash or set(samples.inputs) & set(samples.annotations):
        raise BadInput(f"input columns {clash} clash with the store's own columns; rename them")
    for name, values in samples.annotations.items():
        columns[name] = pa.array(values)
    for name, col in samples.inputs.items():
        typ = pa.int64() if np.issubdtype(col.dtype, np.integer) else pa.float32()
        width = int(np.prod(col.shape[1:]))
        flat = pa.array(col.reshape(-1), type=typ)
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, width).cast(pa.list_(typ))
    shapes = {name: list(col.shape[1:]) for name, col in samples.inputs.items()}
    meta = {b"num_classes": str(samples.num_classes).encode(),
            b"input_shape": ",".join(map(str, samples.input_shape)).encode(),
            b"inputs": json.dumps(shapes).encode(),
            b"annotations": json.dumps(list(samples.annotations)).encode()}
    return pa.table(columns).replace_schema_metadata(meta)


def read_samples(path: Path) -> Samples:
    """Rebuild ``Samples`` from a samples.parquet written by ``samples_table`` (local or a URL)."""
    table = read_parquet_table(path)
    meta = table.schema.metadata or {}
    n = table.num_rows
    inputs = {}
    for name, shape in json.loads(meta[b"inputs"]).items():
        values = table[name].combine_chunks().flatten().to_numpy()
        dtype = np.int64 if np.issubdtype(values.dtype, np.integer) else np.float32
        inputs[name] = values.astype(dtype).reshape(n, *shape)

    def optional(name: str, dtype) -> np.ndarray | None:
        col = table[name]
        return None if col.null_count == n else col.to_numpy(zero_copy_only=False).astype(dtype)

    return Samples(
        sample_id=np.array(table["sample_id"].to_numpy()),
        inputs=inputs,
        label=np.array(table["label"].to_numpy()),
        split=np.asarray(table["split"].to_pylist(), dtype=str),
        num_classes=int(meta[b"num_classes"]),
        input_shape=tuple(int(v) for v in meta[b"input_shape"].decode().split(",")),
        clean_label=optional("clean_label", np.int64),
        corrupted=optional("corrupted", bool),
        group=optional("group", np.int64),
        annotations={name: table[name].to_numpy(zero_copy_only=False)
                     for name in json.loads(meta.get(b"annotations", b"[]"))},
    )
