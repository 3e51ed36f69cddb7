"""``sieve query`` is read-only and sandboxed: statements that write, ATTACH, COPY,
INSTALL/LOAD or change settings are refused, and no table function reads a file outside the
store's runs folder, even after trying to lift the sandbox."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import BadInput
from storage.store import Store
from storage.views import open_run, run_query


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store(tmp_path / "store")
    run = store.run("r1")
    run.dir.mkdir(parents=True)
    pq.write_table(pa.table({"stage": ["train"], "name": ["seconds"], "value": [1.5]}),
                   run.metrics)
    (run.dir / "notes.csv").write_text("a,b\n1,2\n")
    (store.root / "secret.csv").write_text("password\nhunter2\n")  # in the store, not a run
    (tmp_path / "outside.csv").write_text("x\n1\n")
    return store


REFUSED = [
    ("insert into metrics values ('x', 'y', 1.0, null, null, null)", "INSERT statements"),
    ("create table t as select 1", "CREATE statements"),
    ("copy metrics to '{tmp}/out.csv'", "COPY statements"),
    ("attach '{tmp}/other.db' as other", "ATTACH statements"),
    ("install httpfs", "LOAD statements"),
    ("load httpfs", "LOAD statements"),
    ("set enable_external_access = true", "SET statements"),
    ("reset lock_configuration", "SET statements"),
    ("pragma enable_profiling", "PRAGMA statements"),
    ("select 1; drop view metrics", "multiple statements"),
    ("select * from read_csv('/etc/passwd')", "runs folder"),
    ("select * from read_text('/etc/hostname')", "runs folder"),
    ("select * from read_blob('{tmp}/outside.csv')", "runs folder"),
    ("select * from glob('/etc/*')", "runs folder"),
    ("select * from read_csv('{tmp}/store/secret.csv')", "runs folder"),
    ("select * from read_csv('{tmp}/store/runs/../secret.csv')", "runs folder"),
    ("select * from read_parquet('https://example.com/x.parquet')", "runs folder"),
    ("select * from sniff_csv('/etc/passwd')", "runs folder"),
]


@pytest.mark.parametrize(("sql", "reason"), REFUSED)
def test_refused(store, tmp_path, sql, reason):
    with open_run(store.run("r1")) as con, pytest.raises(BadInput, match=reason) as err:
        run_query(con, sql.format(tmp=tmp_path))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "other.db").exists()


def test_the_run_and_its_store_neighbours_stay_readable(store):
    with open_run(store.run("r1")) as con:
        assert run_query(con, "select value from metrics")[1] == [(1.5,)]
        notes = (store.run("r1").dir / "notes.csv").as_posix()
        assert run_query(con, f"select a, b from read_csv('{notes}')")[1] == [(1, 2)]
        files = run_query(con, f"select file from glob('{store.runs_dir.as_posix()}/*/*')")[1]
        assert {f[0].rsplit("/", 1)[-1] for f in files} == {"metrics.parquet", "notes.csv"}


def test_settings_are_locked(store):
    with open_run(store.run("r1")) as con:
        with pytest.raises(Exception, match="locked"):  # even bypassing the guard
            con.execute("set enable_external_access = true")
        settings = dict(con.execute(
            "select name, value from duckdb_settings() where name in "
            "('enable_external_access', 'lock_configuration', 'allowed_directories')"
        ).fetchall())
    assert settings["enable_external_access"] == "false"
    assert settings["lock_configuration"] == "true"
    assert settings["allowed_directories"] == f"[{store.runs_dir.as_posix()}/]"
