"""One writer per run: ``run_lease`` refuses a second ``sieve`` process that would write the same
run (a second ``--resume`` of it) while the first is alive.

- On one machine, an ``flock`` on the run's lock file (``location.lock_file``: next to the run
  folder, or under ``$SIEVE_CACHE_DIR/locks/`` for a URL store). The kernel releases it when the
  process dies, so a run killed with SIGKILL can be resumed at once.
- For a URL store, whose writers may be on several machines, also a lease object in the
  bucket, ``runs/<run_id>/.lease`` (JSON: host, pid, token, expiry): created with a conditional
  PUT (``If-None-Match: *``; S3 and S3-compatible stores), renewed every ``LEASE_TTL_S / 3``
  seconds with ``If-Match`` on its ETag, deleted on exit. A lease is taken over only when it
  has expired (its holder stopped renewing it ``LEASE_TTL_S`` ago), or when its holder is a
  process of this machine that no longer exists (a run killed here resumes at once).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from storage.atomic import process_alive
from storage.errors import BadInput
from storage.location import StorePath, is_remote, lock_file, store_failure

LEASE_TTL_S = 60.0
"""How long a lease holds without renewal; its holder renews it every third of that."""

_log = logging.getLogger(__name__)


def lease_path(run_dir: StorePath) -> StorePath:
    """The lease object of the run in ``run_dir`` (a hidden name: globs never match it)."""
    return run_dir / ".lease"


@contextmanager
def run_lease(run, ttl: float = LEASE_TTL_S) -> Iterator[None]:
    """Hold run ``run``'s (a ``RunPaths``) lock, and for a URL store its lease object, for the
    block. BadInput naming the holder when another live process holds either."""
    with _machine_lock(run):
        if not is_remote(run.dir):
            yield
            return
        lease = _Lease(lease_path(run.dir), run.run_id, ttl)
        lease.acquire()
        try:
            yield
        except BaseException as exc:
            lease.release(delete=store_failure(exc) is None)  # a store that failed: it expires
            raise
        lease.release()


def check_free(run) -> None:
    """BadInput (as ``run_lease`` raises it) when another live process holds run ``run``'s lock
    or lease now: for refusing a ``--resume`` before any work. Writes nothing; ``run_lease``
    decides."""
    path = lock_file(run.dir)
    if os.name == "posix" and path.exists():  # a holder creates it
        import fcntl

        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BadInput(_held_here(run, f.read())) from None
            fcntl.flock(f, fcntl.LOCK_UN)
    if is_remote(run.dir) and lease_path(run.dir).exists():
        lease = _Lease(lease_path(run.dir), run.run_id, LEASE_TTL_S)
        lease.refuse_live(lease.read()[0])


def _held_here(run, holder: str) -> str:
    return (f"run {run.run_id} is being written by {holder.strip() or 'another process'} on "
            "this machine; wait for it to end")


@contextmanager
def _machine_lock(run) -> Iterator[None]:
    if os.name != "posix":
        yield
        return
    import fcntl

    path = lock_file(run.dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise BadInput(_held_here(run, f.read())) from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"sieve pid {os.getpid()}")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Lease:
    """The lease object of one run in a URL store (see the module docstring)."""

    def __init__(self, path: StorePath, run_id: str, ttl: float) -> None:
        self.path, self.run_id, self.ttl = path, run_id, ttl
        self.fs, self.key = path.fs, path.path
        self.token = secrets.token_hex(8)
        self.etag: str | None = None
        self.stop = threading.Event()
        self.renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "token": self.token, "expires": time.time() + self.ttl}).encode()

    def acquire(self) -> None:
        """Create the lease, or take over a stale one; BadInput when a live holder has it."""
        try:
            self.etag = self._put(mode="create")
        except FileExistsError:
            held, etag = self.read()
            self.refuse_live(held)
            try:
                self.etag = self._put(IfMatch=etag)  # only if nobody took it over meanwhile
            except OSError:
                raise BadInput(f"run {self.run_id}: another process took over its lease "
                               f"{self.path} just now") from None
        self.renewer = threading.Thread(target=self._renew, name="sieve-lease", daemon=True)
        self.renewer.start()

    def refuse_live(self, held: dict) -> None:
        """BadInput naming the holder unless lease ``held`` is stale (see ``_stale``)."""
        if self._stale(held):
            return
        until = datetime.fromtimestamp(held["expires"], UTC).strftime("%H:%M:%S UTC")
        raise BadInput(
            f"run {self.run_id} is being written by pid {held['pid']} on {held['host']} "
            f"(lease {self.path} held until {until}, renewed while it runs); one machine at "
            "a time may run or resume a run: wait for it to end")

    def _stale(self, held: dict) -> bool:
        if held.get("expires", 0) < time.time():
            return True
        pid = held.get("pid")
        return (held.get("host") == socket.gethostname() and isinstance(pid, int)
                and not process_alive(pid))

    def read(self) -> tuple[dict, str]:
        """The lease as it is stored ({} when unreadable) and its ETag."""
        info = self.fs.info(self.key)
        try:
            held = json.loads(self.fs.cat_file(self.key))
        except ValueError:
            held = {}
        return held, info.get("ETag", "")

    def _put(self, **kwargs) -> str | None:
        result = self.fs.pipe_file(self.key, self._body(), **kwargs)
        return result.get("ETag") if isinstance(result, dict) else None

    def _renew(self) -> None:
        while not self.stop.wait(self.ttl / 3):
            try:
                self.etag = self._put(**({"IfMatch": self.etag} if self.etag else {}))
            except Exception as exc:  # the store may be away for a while: retry next round
                _log.warning("run %s: could not renew its lease %s: %s", self.run_id,
                             self.path, exc)

    def release(self, delete: bool = True) -> None:
        """Stop renewing and, with ``delete``, delete the lease if it is still ours (best
        effort: a lease left behind expires, or this machine takes it over on resume)."""
        self.stop.set()
        if not delete:  # the renewer (a daemon) may be stuck on the failed store: don't wait
            return
        if self.renewer is not None:
            self.renewer.join()
        try:
            held, _ = self.read()
            if held.get("token") == self.token:
                self.fs.rm_file(self.key)
        except Exception as exc:
            _log.warning("run %s: could not remove its lease %s: %s", self.run_id, self.path,
                         exc)
