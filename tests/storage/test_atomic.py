import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.atomic import (
    atomic_path,
    read_parquet_schema,
    read_parquet_table,
    write_bytes_atomic,
    write_parquet_atomic,
    write_text_atomic,
)


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_path_renames_on_success_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.name.startswith(".file.bin.tmp-")
        tmp.write_bytes(b"hello")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_bytes() == b"hello"
    assert _entries(target.parent) == ["file.bin"]


def test_failed_write_leaves_no_final_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert _entries(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    write_text_atomic("old", target)
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("new, half written")
        raise ValueError
    assert target.read_text() == "old"
    assert _entries(tmp_path) == ["x.txt"]


def test_block_that_writes_nothing_fails_cleanly(tmp_path: Path) -> None:
    target = tmp_path / "never.bin"
    with pytest.raises(FileNotFoundError), atomic_path(target):
        pass
    assert _entries(tmp_path) == []


def test_write_helpers_round_trip_and_replace(tmp_path: Path) -> None:
    write_bytes_atomic(b"\x00\x01", tmp_path / "b.bin")
    write_bytes_atomic(b"\x02", tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == b"\x02"
    write_text_atomic("héllo\n", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    table = pa.table({"a": [1, 2, 3]})
    write_parquet_atomic(table, tmp_path / "sub" / "t.parquet", compression="zstd")
    f = pq.ParquetFile(tmp_path / "sub" / "t.parquet")
    assert f.read().equals(table)
    assert f.metadata.row_group(0).column(0).compression == "ZSTD"


def test_failed_parquet_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017 - pyarrow's own error for a bad option
        write_parquet_atomic(pa.table({"a": [1]}), tmp_path / "t.parquet", compression="nope")
    assert _entries(tmp_path) == []


def test_reader_sees_one_whole_version_during_concurrent_replaces(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    versions = [pa.table({"a": list(range(n)), "b": ["x" * n] * n}) for n in (3, 4000)]
    write_parquet_atomic(versions[0], path)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            write_parquet_atomic(versions[i % 2], path)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(300):
            table = read_parquet_table(path)
            assert table.equals(versions[0]) or table.equals(versions[1])
            schema = read_parquet_schema(path)
            assert schema.names == ["a", "b"]
    finally:
        stop.set()
        thread.join()


def test_read_parquet_table_memory_map_and_missing(tmp_path: Path) -> None:
    table = pa.table({"a": [1.5, 2.5]})
    write_parquet_atomic(table, tmp_path / "t.parquet")
    assert read_parquet_table(tmp_path / "t.parquet", memory_map=True).equals(table)
    with pytest.raises(FileNotFoundError):
        read_parquet_table(tmp_path / "missing.parquet")
