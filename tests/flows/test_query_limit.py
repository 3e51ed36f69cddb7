"""``sieve query`` prints at most --limit rows (default 1,000) and fetches no more than one past
them; ``--limit 0`` prints all. The cap note goes to stderr so csv/json stay valid."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import QUERY_ROWS, main
from storage.store import Store
from storage.views import open_run, run_query


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    run = store.run("r1")
    run.dir.mkdir(parents=True)
    pq.write_table(pa.table({"sample_id": [0], "split": ["train"], "label": [1]}), run.samples)
    return store


def _query(store: Store, capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["query", "--store", str(store.root), "--run", "r1", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_default_cap_and_the_note(store, capsys) -> None:
    code, out, err = _query(store, capsys, "--format", "csv", "select * from range(2500)")
    assert code == 0 and QUERY_ROWS == 1000
    assert out.rstrip("\n").splitlines() == ["range", *map(str, range(1000))]
    assert "the first 1,000 rows" in err and "--limit 0" in err


def test_limit_flag_lifts_or_sets_the_cap(store, capsys) -> None:
    code, out, err = _query(store, capsys, "--format", "json", "--limit", "0",
                            "select * from range(2500)")
    assert code == 0 and len(json.loads(out)) == 2500 and err == ""
    code, out, err = _query(store, capsys, "--limit", "7", "select * from range(7)")
    assert code == 0 and out.rstrip().endswith("7 rows") and err == ""  # exactly 7: no note


def test_negative_limit_is_a_usage_error(store, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["query", "--store", str(store.root), "--limit", "-1", "select 1"])
    assert info.value.code == 2


def test_run_query_fetches_at_most_max_rows(store) -> None:
    with open_run(store.run("r1")) as con:
        columns, rows = run_query(con, "select * from range(100000000)", max_rows=3)
    assert columns == ["range"] and rows == [(0,), (1,), (2,)]
