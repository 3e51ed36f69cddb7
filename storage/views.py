"""DuckDB over one run: in-memory views on its Parquet files, a read-only query guard, output.

Views (always present; an empty relation with the documented columns until files exist):
``samples``, ``checkpoints``, ``metrics``, ``scores`` (estimator, target, sample_id, score, and
any extra columns, by name) and ``attributions`` (estimator, train_id, test_id, score).
Partition columns come from the folder names, not DuckDB's hive parsing, so a ``k=v`` folder
higher up in the store's path never turns into a column. The connection is a sandbox: it reads
only files under the store's ``runs/`` folder and its settings are locked. A URL store's files
are read through its fsspec filesystem, registered with the connection (no DuckDB extension).
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Literal

import duckdb

from storage.errors import BadInput
from storage.location import StorePath, is_remote, location
from storage.store import RunPaths

_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "samples": [
        ("sample_id", "BIGINT"),
        ("split", "VARCHAR"),
        ("label", "BIGINT"),
        ("clean_label", "BIGINT"),
        ("corrupted", "BOOLEAN"),
        ("group", "BIGINT"),
    ],
    "checkpoints": [
        ("checkpoint", "BIGINT"),
        ("step", "BIGINT"),
        ("epoch", "DOUBLE"),
        ("lr", "DOUBLE"),
        ("path", "VARCHAR"),
        ("sha256", "VARCHAR"),
        ("step_lr", "DOUBLE"),
        ("model", "BIGINT"),
    ],
    "metrics": [
        ("stage", "VARCHAR"),
        ("name", "VARCHAR"),
        ("value", "DOUBLE"),
        ("estimator", "VARCHAR"),
        ("seed", "BIGINT"),
        ("step", "BIGINT"),
    ],
    "scores": [
        ("estimator", "VARCHAR"),
        ("target", "VARCHAR"),
        ("sample_id", "BIGINT"),
        ("score", "DOUBLE"),
        ("suspicion", "DOUBLE"),
    ],
    "attributions": [
        ("estimator", "VARCHAR"),
        ("train_id", "BIGINT"),
        ("test_id", "BIGINT"),
        ("score", "DOUBLE"),
    ],
    "evaluation": [
        ("estimator", "VARCHAR"),
        ("metric", "VARCHAR"),
        ("value", "DOUBLE"),
    ],
}


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _read(files: Sequence[StorePath]) -> str:
    listed = ", ".join(_lit(location(f)) for f in files)
    return f"read_parquet([{listed}], union_by_name = true, hive_partitioning = false)"


def _empty(view: str) -> str:
    cols = ", ".join(f"NULL::{t} AS {_ident(n)}" for n, t in _COLUMNS[view])
    return f"SELECT {cols} WHERE false"


def _parquet_files(directory: StorePath) -> list[StorePath]:
    """Complete Parquet files directly in ``directory`` (temp files are hidden: skipped)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith("."))


def _partitions(directory: StorePath, key: str) -> list[tuple[str, StorePath]]:
    """(value, folder) for each ``key=value`` folder in ``directory``, sorted by value."""
    if not directory.is_dir():
        return []
    prefix = f"{key}="
    return sorted(
        (p.name[len(prefix) :], p)
        for p in directory.iterdir()
        if p.is_dir() and p.name.startswith(prefix)
    )


def _partitioned(leaves: list[tuple[dict[str, str], list[StorePath]]], view: str) -> str:
    """UNION ALL BY NAME of each leaf folder's files, with its partition values as columns."""
    branches = []
    for values, files in leaves:
        if files:
            keys = ", ".join(f"{_lit(v)} AS {_ident(k)}" for k, v in values.items())
            branches.append(f"SELECT {keys}, * FROM {_read(files)}")
    return "\nUNION ALL BY NAME\n".join(branches) if branches else _empty(view)


def _view_sql(run: RunPaths) -> dict[str, str]:
    sql = {}
    for view, path in (
        ("samples", run.samples),
        ("checkpoints", run.checkpoint_index),
        ("metrics", run.metrics),
        ("evaluation", run.evaluation),
    ):
        sql[view] = f"SELECT * FROM {_read([path])}" if path.is_file() else _empty(view)
    scores = [
        ({"estimator": e, "target": t}, _parquet_files(t_dir))
        for e, e_dir in _partitions(run.scores_root, "estimator")
        for t, t_dir in _partitions(e_dir, "target")
    ]
    sql["scores"] = _partitioned(scores, "scores")
    attributions = [
        ({"estimator": e}, _parquet_files(e_dir))
        for e, e_dir in _partitions(run.attributions_root, "estimator")
    ]
    sql["attributions"] = _partitioned(attributions, "attributions")
    return sql


def open_run(run: RunPaths) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the run's views, sandboxed to the store's runs.

    Files are listed (and their schemas read) now: shards completed later need a new
    connection. BadInput when a file is unreadable. The connection can read only files under
    the store's ``runs/`` folder (every run's Parquet, config.yaml...): any other path, URL,
    ATTACH or extension install/load fails, and the settings are locked so no statement can
    lift that (``_sandbox``).
    """
    con = duckdb.connect(":memory:")
    try:
        if is_remote(run.dir):
            con.register_filesystem(run.dir.fs)
        for view, sql in _view_sql(run).items():
            try:
                con.execute(f"CREATE VIEW {view} AS {sql}")
            except duckdb.Error as e:
                reason = _first_line(e)
                raise BadInput(f"cannot read {view} of run {run.run_id}: {reason}") from None
        _sandbox(con, run.dir.parent)
    except BaseException:
        con.close()
        raise
    return con


def _sandbox(con: duckdb.DuckDBPyConnection, allowed: StorePath) -> None:
    """Restrict file access to ``allowed`` (and below; a URL: objects under that prefix), with
    no spill folder and no extension loading, then lock the configuration (a later SET fails)."""
    folder = allowed if is_remote(allowed) else allowed.resolve()
    prefix = location(folder).rstrip("/") + "/"
    for statement in (
        "SET temp_directory = ''",
        f"SET allowed_directories = [{_lit(prefix)}]",
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ):
        con.execute(statement)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_query(
    con: duckdb.DuckDBPyConnection, sql: str, max_rows: int | None = None
) -> tuple[list[str], list[tuple]]:
    """Run exactly one read-only (SELECT-type) statement; return (column names, rows): at most
    ``max_rows`` rows (None: all), fetched with ``fetchmany`` from DuckDB's streamed result,
    so the rows past them are never fetched into Python.

    SELECT-type covers SELECT, WITH, VALUES, FROM-first, DESCRIBE, SHOW, SUMMARIZE. Every other
    statement (INSERT, CREATE, COPY, ATTACH, INSTALL/LOAD, SET, PRAGMA, CALL, EXPLAIN, PIVOT...)
    and more than one statement raise BadInput; so do DuckDB's errors (first line), among them
    the sandbox's refusal to touch a file outside the store's runs folder (see ``open_run``).
    """
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise BadInput(_first_line(e)) from None
    if not statements:
        raise BadInput("sieve query needs one SELECT statement, got none")
    if len(statements) > 1:
        raise BadInput(
            f"sieve query is read-only: multiple statements are refused (got {len(statements)})"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise BadInput(f"sieve query is read-only: {kind.name} statements are refused")
    try:
        cursor = con.execute(statements[0].query)
        columns = [d[0] for d in cursor.description or []]
        rows = cursor.fetchall() if max_rows is None else cursor.fetchmany(max_rows)
    except duckdb.PermissionException as e:
        raise BadInput(
            f"sieve query reads only the store's runs folder: {_first_line(e)}"
        ) from None
    except duckdb.Error as e:
        raise BadInput(_first_line(e)) from None
    return columns, rows


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_rows(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    fmt: Literal["table", "csv", "json"] = "table",
    width: int | None = None,
) -> str:
    """Render a result.

    csv: a header line then one line per row (NULL is empty). json: a list of objects (NaN and
    infinities become null, decimals numbers, other non-JSON values strings). table: a rich
    table (floats to 6 significant digits, NULL shown) ``width`` columns wide (default: the
    terminal's), then a line with the row count. Unknown formats raise BadInput.
    """
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return buf.getvalue()
    if fmt == "json":
        objects = [{c: _json_value(v) for c, v in zip(columns, row, strict=True)} for row in rows]
        return json.dumps(objects, default=str)
    if fmt == "table":
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table()
        for c in columns:
            table.add_column(Text(c), overflow="fold")
        for row in rows:
            table.add_row(*(Text(_cell(v)) for v in row))
        buf = io.StringIO()
        width = width or shutil.get_terminal_size((120, 24)).columns
        Console(file=buf, width=width, color_system=None, force_terminal=False).print(table)
        return buf.getvalue() + f"{len(rows)} row{'' if len(rows) == 1 else 's'}\n"
    raise BadInput(f"unknown format {fmt!r}: use table, csv or json")
