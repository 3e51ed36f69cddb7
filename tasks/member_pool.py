"""Ensemble members scored side by side: worker processes beside the score stage's own.

With ``train.models = K > 1`` the score stage computes each model's scores (and train x test
vectors) with one torch thread, so one model at a time leaves the other cores idle. A
``MemberPool`` holds ``W - 1`` worker processes for the stage's lifetime, W =
``train.models_in_parallel`` (default: one per CPU core this process may use, at most K). For
each estimator, the stage's process takes members 0, 1, 2, ... and the workers take K - 1,
K - 2, ... until they meet: a member is claimed by creating its file in a fresh folder
(``O_EXCL``), so each is computed exactly once, and a worker that is slow to start leaves
every member to the stage (never slower than one after the other, bar the claim files).

A worker rebuilds the score context from the run's files (``tasks.score.scoring_context``)
and runs ``ModelEnsemble.member_result``: the same code, one torch thread, the same numbers as
in the stage's process. A worker that dies (killed, out of memory) loses only time: the
members it had are computed in the stage's process, with a warning, and the next estimator
gets fresh workers. Processes, not threads: torch's forward-mode AD (the GGN products)
has one global level and fails when two threads use it at once. Workers are forked from a fork
server that imported this module (``_worker_context``), and they do not import the caller's
main module (``_main_module_hidden``). Memory: each worker holds one
member at a time (its model, gradients and solve) plus its own torch runtime; results come
back pickled (an Attribution: n floats; pairwise vectors: T x d floats).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from estimators.model_ensemble import MemberMethod, ModelEnsemble
from storage.checkpoints import CheckpointRecord
from storage.store import RunPaths
from tasks.config import Config


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parallel_members(config: Config) -> int:
    """Members scored at once: ``train.models_in_parallel``, else one per usable core, at most
    ``train.models``; 1 inside a daemonic process (a Dask worker: it may not start children)."""
    if multiprocessing.current_process().daemon:
        return 1
    wanted = config.train.models_in_parallel or usable_cores()
    return max(1, min(config.train.models, wanted))


@dataclass(frozen=True)
class MemberJob:
    """What a worker needs to rebuild one estimator's ensemble and score context."""

    run: RunPaths
    config: Config
    records: list[CheckpointRecord]
    name: str


class MemberPool:
    """``workers`` processes that compute ensemble members; ``runner(job)`` is the
    ``MemberRunner`` of one estimator. Close it (``member_pool``) to stop the workers."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def start(self) -> ProcessPoolExecutor:
        """Start the workers now, in the background (what ``runner`` does on first use): each
        gets the score stage's modules imported while this process goes on."""
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=_worker_context(),
                                                 initializer=_start_worker)
            with _main_module_hidden():  # the workers start in submit
                for _ in range(self.workers):
                    self._executor.submit(_ready)
        return self._executor

    def runner(self, job: MemberJob,
               announce: Callable[[int, int], None] | None = None) -> _Runner:
        """The runner of ``job``'s estimator; ``announce(m, K)`` after a worker computed
        member m. Workers start on first use, and again after a worker was lost."""
        return _Runner(self, self.start(), job, announce)

    def lost(self, executor: ProcessPoolExecutor) -> None:
        """``executor`` lost a worker: stop it; the next runner starts fresh workers."""
        if self._executor is executor:
            self.close()

    def close(self) -> None:
        """Stop the workers now (a member still running is abandoned)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        executor.shutdown(wait=False, cancel_futures=True)
        terminate = getattr(executor, "terminate_workers", None)  # Python >= 3.14
        if terminate is not None:
            terminate()
        else:
            for process in list((executor._processes or {}).values()):
                process.terminate()
        executor.shutdown(wait=True)


@contextmanager
def member_pool(config: Config) -> Iterator[MemberPool | None]:
    """A pool of ``parallel_members(config) - 1`` workers for the block, None when that is 0;
    the workers start at once (in the background) and are stopped when the block ends,
    however it ends."""
    workers = parallel_members(config) - 1
    if workers < 1:
        yield None
        return
    pool = MemberPool(workers)
    try:
        pool.start()
        yield pool
    finally:
        pool.close()


class _Runner:
    """``MemberRunner`` over a pool: the caller from member 0 up, the workers from K - 1 down;
    what a lost worker held is computed by the caller."""

    def __init__(self, pool: MemberPool, executor: ProcessPoolExecutor, job: MemberJob,
                 announce: Callable[[int, int], None] | None) -> None:
        self._pool = pool
        self._executor = executor
        self._job = job
        self._announce = announce

    def map(self, method: MemberMethod, count: int, here: Callable[[int], Any]) -> list[Any]:
        claims = Path(tempfile.mkdtemp(prefix="sieve-members-"))
        try:
            with _main_module_hidden():  # workers start in submit
                away = {m: self._executor.submit(_member, self._job, method, m, str(claims))
                        for m in range(count - 1, 0, -1)}
            results = {m: here(m) for m in range(count) if claim(claims, m)}
            for m, pending in away.items():
                try:
                    result = pending.result()
                except BrokenProcessPool:
                    self._pool.lost(self._executor)
                    continue
                if result is not None:
                    results[m] = result
                    if self._announce is not None:
                        self._announce(m, count)
            for m in range(count):
                if m not in results:
                    warnings.warn(f"{self._job.name}: a worker process was lost while it held "
                                  f"model {m}; computing it here", RuntimeWarning, stacklevel=2)
                    results[m] = here(m)
            return [results[m] for m in range(count)]
        finally:
            shutil.rmtree(claims, ignore_errors=True)


def claim(folder: Path, member: int) -> bool:
    """True for the first process to claim ``member`` in ``folder`` (atomic file creation)."""
    try:
        os.close(os.open(folder / str(member), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


WORKER_MODULES = [__name__, "tasks.score"]
"""What a worker imports before its first member (2-4 s, torch and Prefect among them)."""


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a fork server that imported ``WORKER_MODULES`` once, spawned where
    there is no fork server (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_MODULES)
    return context


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """While workers start, the caller's ``__main__`` has no file and no spec, as in an
    interactive session, so multiprocessing does not import it again in them: a script that
    runs the flow without ``if __name__ == "__main__"`` would otherwise run again in every
    worker. The jobs need only this package."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _start_worker() -> None:
    """One torch thread, as in the score stage; Ctrl-C is the stage's to handle."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _ready() -> None:
    """A worker's first job: the modules its members need are imported (a no-op when the fork
    server imported them)."""
    for module in WORKER_MODULES:
        importlib.import_module(module)


_ensembles: dict[tuple[str, str], ModelEnsemble] = {}
"""This worker's ensemble per (run, estimator): a member's ``score`` then ``pairwise_vectors``
reuse what its estimator keeps (the damping's spectrum)."""


def _member(job: MemberJob, method: MemberMethod, m: int, claims: str) -> Any:
    """Member m's result, or None when another process claimed it first."""
    if not claim(Path(claims), m):
        return None
    from tasks.ensemble import scored_estimator
    from tasks.score import scoring_context

    key = (str(job.run.dir), job.name)
    if key not in _ensembles:
        ensemble = scored_estimator(job.config, job.name)
        if not isinstance(ensemble, ModelEnsemble):
            raise ValueError(f"{job.name} is not averaged over models")
        ensemble.on_member = None  # the stage's run logger lives in the stage's process
        _ensembles.clear()
        _ensembles[key] = ensemble
    ctx = scoring_context(job.run, job.config, job.records,
                          pairwise=method == "pairwise_vectors")
    return _ensembles[key].member_result(ctx, method, m)
