"""metrics.parquet: every metric a run produced, as (stage, name, value, estimator, seed, step)."""

from __future__ import annotations

import threading
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from storage.atomic import read_parquet_table, write_parquet_atomic
from storage.errors import BadInput
from storage.location import StorePath, store_path

METRICS_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("name", pa.string()),
        ("value", pa.float64()),
        ("estimator", pa.string()),
        ("seed", pa.int64()),
        ("step", pa.int64()),
    ]
)
_ROW_KEYS = {"name", "value", "estimator", "seed", "step"}
_LOCK = threading.Lock()
"""Serializes this process's writers (threads). Other processes never write a run's metrics
meanwhile: a run is written by the one process holding its lease (``storage.leases``), so no
lock file is left in the run folder."""


def _optional_int(row: dict[str, Any], key: str) -> int | None:
    value = row.get(key)
    return None if value is None else int(value)


def _validate(stage: str, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {name: [] for name in METRICS_SCHEMA.names}
    for row in rows:
        unknown = set(row) - _ROW_KEYS
        if unknown or "name" not in row or "value" not in row:
            raise ValueError(f"metric row needs name, value (+ estimator, seed, step): {row!r}")
        columns["stage"].append(stage)
        columns["name"].append(str(row["name"]))
        columns["value"].append(float(row["value"]))
        estimator = row.get("estimator")
        columns["estimator"].append(None if estimator is None else str(estimator))
        columns["seed"].append(_optional_int(row, "seed"))
        columns["step"].append(_optional_int(row, "step"))
    return columns


def read_metrics(path: StorePath) -> pa.Table:
    """All rows of ``path`` (an empty table when the file does not exist yet).

    BadInput when the file exists but is unreadable.
    """
    path = store_path(path)
    if not path.exists():
        return METRICS_SCHEMA.empty_table()
    try:
        return read_parquet_table(path).select(METRICS_SCHEMA.names).cast(METRICS_SCHEMA)
    except (OSError, KeyError, pa.ArrowException) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"unreadable metrics file {path}: {reason}") from None


def record_metrics(path: StorePath, stage: str, rows: list[dict[str, Any]]) -> None:
    """Replace every row of ``stage`` in ``path`` by ``rows``; other stages are kept.

    Each row: ``name``, ``value`` (float; NaN allowed) and optional ``estimator``, ``seed``,
    ``step``. Rerunning a stage therefore never duplicates its rows. The file is rewritten
    atomically; concurrent calls (threads, or processes on POSIX) are serialized.
    """
    path = store_path(path)
    new = pa.table(_validate(stage, rows), schema=METRICS_SCHEMA)
    with _LOCK:
        old = read_metrics(path)
        keep = old.filter(pc.not_equal(old["stage"], stage)) if old.num_rows else old
        write_parquet_atomic(pa.concat_tables([keep, new]), path)
