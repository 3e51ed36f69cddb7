import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from storage.checkpoints import CheckpointRecord, save_checkpoint, write_checkpoint_index
from storage.errors import BadInput
from storage.metrics import record_metrics
from storage.store import RunPaths, Store
from storage.views import format_rows, open_run, run_query


def _scores(run: RunPaths, estimator: str, target: str, part: int, **columns) -> None:
    path = run.scores_dir(estimator, target) / f"part-{part}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


@pytest.fixture
def run(tmp_path: Path) -> RunPaths:
    # a k=v folder above the store must not become a column
    return Store(tmp_path / "year=2026" / "store").run("r1")


@pytest.fixture
def full_run(run: RunPaths) -> RunPaths:
    run.dir.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "sample_id": [0, 1, 2, 3],
                "split": ["train", "train", "train", "val"],
                "label": [1, 0, 1, 1],
                "clean_label": [1, 1, 1, 1],
                "corrupted": [False, True, False, False],
                "group": [0, 1, 0, 1],
            }
        ),
        run.samples,
    )
    _scores(run, "tracin", "val", 0, sample_id=[0, 1], score=[0.5, -2.0])
    _scores(run, "tracin", "val", 1, sample_id=[2], score=[0.25])
    _scores(run, "loss", "val", 0, sample_id=[0, 1, 2], score=[-0.1, -3.0, 0.0])
    _scores(run, "ip", "0", 0, sample_id=[0, 1, 2], score=[1.0, 2.0, 3.0], suspicion=[9.0] * 3)
    # a half-written shard (hidden temp name) is never read
    (run.scores_dir("ip", "0") / ".part-1.parquet.tmp-1-ab").write_bytes(b"half")
    record_metrics(run.metrics, "train", [{"name": "acc", "value": 0.9}])
    path, sha = save_checkpoint(run.checkpoints_dir, 10, torch.nn.Linear(1, 1).state_dict())
    write_checkpoint_index(run.checkpoints_dir, [CheckpointRecord(0, 10, 1.0, 0.1, str(path), sha)])
    att = run.attributions_dir("trak") / "part-0.parquet"
    att.parent.mkdir(parents=True)
    pq.write_table(pa.table({"train_id": [0, 1], "test_id": [3, 3], "score": [0.1, -0.2]}), att)
    return run


def q(run: RunPaths, sql: str) -> tuple[list[str], list[tuple]]:
    return run_query(open_run(run), sql)


def test_scores_view_has_partition_columns_and_extra_columns(full_run: RunPaths) -> None:
    cols, rows = q(full_run, "select * from scores order by estimator, target, sample_id")
    assert cols == ["estimator", "target", "sample_id", "score", "suspicion"]
    assert rows == [
        ("ip", "0", 0, 1.0, 9.0),
        ("ip", "0", 1, 2.0, 9.0),
        ("ip", "0", 2, 3.0, 9.0),
        ("loss", "val", 0, -0.1, None),
        ("loss", "val", 1, -3.0, None),
        ("loss", "val", 2, 0.0, None),
        ("tracin", "val", 0, 0.5, None),
        ("tracin", "val", 1, -2.0, None),
        ("tracin", "val", 2, 0.25, None),
    ]
    _, types = q(full_run, "select typeof(estimator), typeof(target) from scores limit 1")
    assert types == [("VARCHAR", "VARCHAR")]


def test_joins_across_views(full_run: RunPaths) -> None:
    _, rows = q(
        full_run,
        """select s.sample_id, s.corrupted from scores sc join samples s using (sample_id)
           where sc.estimator = 'tracin' order by sc.score limit 1""",
    )
    assert rows == [(1, True)]
    assert q(full_run, "select name, value from metrics")[1] == [("acc", 0.9)]
    assert q(full_run, "select checkpoint, step, path from checkpoints")[1] == [
        (0, 10, "step-10.pt")
    ]
    assert q(full_run, "select * from attributions order by train_id")[1] == [
        ("trak", 0, 3, 0.1),
        ("trak", 1, 3, -0.2),
    ]
    cols, rows = q(full_run, "select * from samples where sample_id = 3")
    assert cols == ["sample_id", "split", "label", "clean_label", "corrupted", "group"]
    assert rows == [(3, "val", 1, 1, False, 1)]


@pytest.mark.parametrize("view", ["samples", "checkpoints", "scores", "metrics", "attributions"])
def test_views_without_files_are_empty_with_columns(run: RunPaths, view: str) -> None:
    cols, rows = q(run, f"select * from {view}")
    assert rows == []
    assert {
        "scores": "score",
        "samples": "sample_id",
        "metrics": "stage",
        "checkpoints": "sha256",
        "attributions": "train_id",
    }[view] in cols


def test_empty_scores_view_columns(run: RunPaths) -> None:
    run.scores_root.mkdir(parents=True)  # folder exists but holds nothing complete
    (run.scores_root / "estimator=ip" / "target=val").mkdir(parents=True)
    cols, rows = q(run, "select * from scores")
    assert (cols, rows) == (["estimator", "target", "sample_id", "score", "suspicion"], [])


@pytest.mark.parametrize(
    "sql, kind",
    [
        ("insert into scores values ('a', 'b', 1, 1.0)", "INSERT"),
        ("create table t as select 1", "CREATE"),
        ("copy (select 1) to 'out.csv'", "COPY"),
        ("attach 'other.db' as o", "ATTACH"),
        ("install httpfs", "LOAD"),
        ("load httpfs", "LOAD"),
        ("set threads = 1", "SET"),
        ("pragma version", "PRAGMA"),
        ("call pragma_version()", "CALL"),
        ("drop view scores", "DROP"),
        ("explain analyze select 1", "EXPLAIN"),
    ],
)
def test_read_only_guard_refuses(full_run: RunPaths, tmp_path: Path, monkeypatch, sql, kind):
    monkeypatch.chdir(tmp_path)
    con = open_run(full_run)
    with pytest.raises(
        BadInput, match=f"^sieve query is read-only: {kind} statements are refused$"
    ):
        run_query(con, sql)
    assert list(tmp_path.glob("out.csv")) == [] and list(tmp_path.glob("other.db")) == []
    assert run_query(con, "select count(*) from scores")[1] == [(9,)]


def test_multiple_statements_are_refused(full_run: RunPaths) -> None:
    con = open_run(full_run)
    for sql in ("select 1; select 2", "select 1; drop view scores"):
        with pytest.raises(BadInput, match="read-only: multiple statements are refused"):
            run_query(con, sql)
    assert run_query(con, "select count(*) from scores")[1] == [(9,)]
    with pytest.raises(BadInput, match="got none"):
        run_query(con, "  ;  ")


@pytest.mark.parametrize(
    "sql",
    [
        "select count(*) as n from scores",
        "with t as (select * from scores) select count(*) as n from t",
        "from scores select count(*) as n",
        "select count(*) as n from scores;",
    ],
)
def test_select_and_with_are_allowed(full_run: RunPaths, sql: str) -> None:
    assert q(full_run, sql) == (["n"], [(9,)])


def test_sql_errors_are_one_line_bad_input(full_run: RunPaths) -> None:
    con = open_run(full_run)
    for sql, needle in (
        ("select * from nope", "nope"),
        ("select nope from scores", "nope"),
        ("selec 1", "syntax error"),
    ):
        with pytest.raises(BadInput, match=needle) as e:
            run_query(con, sql)
        assert "\n" not in str(e.value)


def test_format_csv_and_json() -> None:
    cols = ["estimator", "score", "n"]
    rows = [("ip", 0.5, 1), ('a,"b"', float("nan"), None)]
    text = format_rows(cols, rows, "csv")
    assert list(csv.reader(io.StringIO(text))) == [cols, ["ip", "0.5", "1"], ['a,"b"', "nan", ""]]
    assert json.loads(format_rows(cols, rows, "json")) == [
        {"estimator": "ip", "score": 0.5, "n": 1},
        {"estimator": 'a,"b"', "score": None, "n": None},
    ]
    assert json.loads(format_rows(cols, [], "json")) == []


def test_format_json_of_duckdb_types(full_run: RunPaths) -> None:
    cols, rows = q(full_run, "select 1.5 as d, date '2026-01-02' as day, [1, 2] as l")
    assert json.loads(format_rows(cols, rows, "json")) == [
        {"d": 1.5, "day": "2026-01-02", "l": [1, 2]}
    ]


def test_format_table() -> None:
    text = format_rows(["name", "score"], [("[bold]x[/bold]", 0.123456789), ("y", None)], "table")
    assert "[bold]x[/bold]" in text  # cells are not rich markup
    assert "0.123457" in text and "NULL" in text and "2 rows" in text
    assert "score" in text.splitlines()[1]
    assert text.endswith("\n2 rows\n")
    assert format_rows(["a"], [], "table").endswith("\n0 rows\n")
    with pytest.raises(BadInput, match="unknown format"):
        format_rows(["a"], [], "xml")  # type: ignore[arg-type]


def test_unreadable_file_is_bad_input(run: RunPaths) -> None:
    _scores(run, "ip", "val", 0, sample_id=[1], score=[1.0])
    (run.scores_dir("ip", "val") / "part-1.parquet").write_bytes(b"garbage")
    with pytest.raises(BadInput, match="^cannot read scores of run r1: .*part-1.parquet") as e:
        open_run(run)
    assert "\n" not in str(e.value)
