"""Where store files live: a local path (``pathlib.Path``) or an fsspec URL (``upath.UPath``,
e.g. ``s3://bucket/prefix``), and the few operations that differ between the two.

A local path is always a plain ``Path`` (absolute once the store resolves it), so local stores
behave exactly as ordinary folders. A URL is a ``UPath`` over its fsspec filesystem; its
credentials and endpoint come from fsspec's usual configuration (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``..., or ``~/.aws``). What cannot live in an
object store (MLflow's sqlite database, Prefect's home, file locks) lives in the URL's local
folder, ``local_folder``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import TypeAlias

import pyarrow as pa
from upath import UPath

from storage.errors import BadInput

StorePath: TypeAlias = Path | UPath
"""A local ``Path`` or a URL's ``UPath``."""

_LOCAL_PROTOCOLS = ("", "file", "local")


def is_url(value: str | os.PathLike) -> bool:
    """Whether ``value`` names a non-local fsspec URL (``s3://...``, ``gs://...``, ``memory://``)."""
    text = os.fspath(value) if not isinstance(value, UPath) else str(value)
    protocol = text.split("://", 1)[0] if "://" in text else ""
    return protocol.lower() not in _LOCAL_PROTOCOLS


def store_path(value: str | os.PathLike) -> StorePath:
    """``value`` as a ``UPath`` when it is a URL, else as a plain ``Path`` (``file://`` URLs
    included). BadInput for a URL whose protocol fsspec does not know or cannot load.

    A URL's filesystem keeps no listings cache: other processes (workers, a resumed run) add
    objects, and a cached listing would hide them.
    """
    if isinstance(value, Path) and not isinstance(value, UPath):
        return value
    if isinstance(value, UPath):
        return value if is_remote(value) else Path(value.path)
    text = os.fspath(value)
    if not is_url(text):
        return Path(text.split("://", 1)[1] if "://" in text else text)
    options = S3_OPTIONS if text.split("://", 1)[0].lower() in ("s3", "s3a") else {}
    try:
        return UPath(text, use_listings_cache=False, **options)
    except (ValueError, ImportError) as e:
        raise BadInput(f"cannot open store URL {text}: {first_line(e)}") from None


S3_RETRIES = {"mode": "standard", "max_attempts": 5}
"""botocore's retries for an S3 store: a request that fails with a connection error, a
timeout, a 5xx or throttling is sent up to 5 times in all, after exponential backoff with
jitter (a random wait in [0, 2^i) s before retry i, at most 20 s: 15 s at most in all)."""
S3_OPTIONS = {"config_kwargs": {"retries": S3_RETRIES, "connect_timeout": 5,
                                "read_timeout": 60}}
"""Options of every S3 store's filesystem: the retries above, 5 s to connect, 60 s to read."""


def is_remote(path: StorePath) -> bool:
    """Whether ``path`` lives in an fsspec filesystem other than the local disk."""
    return not isinstance(path, Path)


def location(path: StorePath) -> str:
    """How DuckDB, messages and indexes name ``path``: the URL, or the local POSIX path."""
    return str(path) if is_remote(path) else path.as_posix()


def resolved(path: str | os.PathLike) -> StorePath:
    """``path`` made absolute: a local path resolved against the current directory, a URL as
    it is."""
    path = store_path(path)
    return path if is_remote(path) else path.expanduser().resolve()


def is_within(path: StorePath, folder: StorePath) -> bool:
    """Whether ``path`` lies in ``folder`` (both absolute; never across filesystems)."""
    if is_remote(path) != is_remote(folder):
        return False
    if is_remote(path):
        return str(path).startswith(str(folder).rstrip("/") + "/")
    return path.is_relative_to(folder)


def joined(folder: StorePath, entry: str) -> StorePath:
    """An index entry read back: a URL or absolute local path as it is, else ``folder/entry``."""
    if is_url(entry):
        return store_path(entry)
    return Path(entry) if PurePosixPath(entry).is_absolute() else folder / entry


def input_file(path: StorePath, *, memory_map: bool = False) -> pa.NativeFile:
    """One open handle on the whole file for pyarrow: a local file (memory-mapped when asked),
    or a URL's object fetched in one request into memory. FileNotFoundError when it is missing.
    """
    if not is_remote(path):
        return pa.memory_map(str(path)) if memory_map else pa.OSFile(str(path))
    return pa.BufferReader(path.read_bytes())


def streamed_file(path: StorePath):
    """A seekable binary file that reads ``path`` range by range (a URL's object is never
    fetched whole): for footers and streaming reads. FileNotFoundError when it is missing."""
    if not is_remote(path):
        return pa.OSFile(str(path))
    return path.open("rb")


def parquet_source(path: StorePath):
    """What ``pq.ParquetFile`` opens (and closes) to stream ``path``: a local path as a string,
    a URL as a seekable file reading range by range."""
    return path.open("rb") if is_remote(path) else str(path)


def _cache_dir() -> Path:
    """``$SIEVE_CACHE_DIR``, default ``~/.cache/sieve``: local stand-ins for URL stores."""
    return Path(os.environ.get("SIEVE_CACHE_DIR") or "~/.cache/sieve").expanduser().resolve()


def local_folder(url: StorePath) -> Path:
    """The local folder that stands in for ``url`` where a local file is needed (MLflow's
    database, Prefect's home): ``$SIEVE_CACHE_DIR/<protocol>/<bucket>/<key>``. A local path is
    its own local folder."""
    if not is_remote(url):
        return url
    parts = [p for p in url.path.split("/") if p not in ("", ".", "..")]
    return _cache_dir().joinpath(url.protocol or "url", *parts)


def lock_file(path: StorePath) -> Path:
    """A local lock file for ``path``: next to it when local, else
    ``$SIEVE_CACHE_DIR/locks/<sha256 of the URL>.lock`` (so it locks one machine's writers)."""
    if not is_remote(path):
        return path.parent / f".{path.name}.lock"
    return _cache_dir() / "locks" / f"{hashlib.sha256(str(path).encode()).hexdigest()}.lock"


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_CONNECTION_ERRORS = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError",
    "ReadTimeoutError", "ClientConnectionError", "ServerDisconnectedError",
})
"""botocore's and aiohttp's errors for an endpoint that does not answer (by class name: the
store's filesystem package is optional)."""


def store_failure(exc: BaseException) -> str | None:
    """The reason (one line) when ``exc``, or an error it was raised from, says a URL store did
    not answer: a connection refused, reset or timed out, after the filesystem's retries;
    None otherwise."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        if isinstance(current, ConnectionError | TimeoutError) or names & _CONNECTION_ERRORS:
            return first_line(current)
        current = current.__cause__ or current.__context__
    return None
