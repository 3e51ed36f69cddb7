"""Atomic file writes: a reader sees the old file or the complete new one, never half of one."""

from __future__ import annotations

import errno
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import BadInput
from storage.location import (
    StorePath,
    input_file,
    is_remote,
    location,
    store_path,
    streamed_file,
)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory`` (POSIX only; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: StorePath) -> Iterator[Path]:
    """Yield a temporary local path; write it inside the block.

    On normal exit the temporary file is fsync'd and renamed onto ``path`` (replacing any old
    file). On an exception it is removed and ``path`` is left untouched. Parent directories are
    created. The temporary name is hidden (``.{name}.tmp-{pid}-{random}``), so globs such as
    ``part-*.parquet`` never match it. When ``path`` is a URL the temporary file (named like
    ``path``) is in a local temporary folder and is uploaded in one PUT, which an object store
    makes visible only once complete (a temporary object and a move would be a copy there).
    A full disk (ENOSPC, also as pyarrow reports it) is BadInput ``no space left on the store
    at <folder>``, with the temporary file removed.
    """
    path = store_path(path)
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="sieve-upload-") as folder:
            tmp = Path(folder) / path.name
            yield tmp
            path.fs.put_file(str(tmp), path.path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if no_space(exc):
            raise BadInput(f"no space left on the store at {location(path.parent)}") from None
        raise
    _fsync_dir(path.parent)


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full: an OSError with errno ENOSPC, or pyarrow's error
    for one (an OSError without errno whose message is strerror(ENOSPC))."""
    return isinstance(exc, OSError) and (
        exc.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(exc))


def write_parquet_atomic(table: pa.Table, path: StorePath, **write_kwargs: object) -> None:
    """Write ``table`` to ``path`` atomically; ``write_kwargs`` go to ``pq.write_table``."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **write_kwargs)


def write_bytes_atomic(data: bytes, path: StorePath) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(text: str, path: StorePath) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(text.encode("utf-8"), path)


def read_parquet_table(
    path: StorePath, *, memory_map: bool = False, **read_kwargs: object
) -> pa.Table:
    """Read a whole Parquet file through ONE open handle (a URL: one request).

    ``pq.read_table(path)`` opens the path twice (footer, then data), so an atomic replace in
    between can pair one version's footer with the other's pages. Reading through a single
    handle always sees exactly one version. Raises what pyarrow raises (FileNotFoundError,
    ``pa.ArrowException``, OSError).
    """
    with input_file(store_path(path), memory_map=memory_map) as source:
        return pq.read_table(source, **read_kwargs)


def read_parquet_schema(path: StorePath) -> pa.Schema:
    """The Arrow schema (with its metadata) of a Parquet file, reading only the footer."""
    with streamed_file(store_path(path)) as source:
        return pq.ParquetFile(source).schema_arrow


_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")


def remove_stale_temporaries(directory: StorePath) -> list[Path]:
    """Delete the temporary files (``.{name}.tmp-{pid}-{hex}``) under ``directory`` left by
    writers that died (no process ``pid`` is alive), e.g. a run killed mid-write; return them.

    Final files are never touched, nor a temporary file whose writer may still be running.
    A URL's folder holds none (its writers upload complete files only).
    """
    directory = store_path(directory)
    if is_remote(directory):
        return []
    removed = []
    for path in directory.rglob(".*.tmp-*"):
        m = _TEMPORARY.match(path.name)
        if m and path.is_file() and not process_alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` may be running (always True where that can't be checked)."""
    if pid == os.getpid() or os.name != "posix":  # on Windows os.kill(pid, 0) would kill it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but owned by someone else (PermissionError), or not checkable
        return True
    return True
