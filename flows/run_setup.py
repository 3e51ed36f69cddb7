"""What every flow does first: the run folder, its resolved config, the MLflow parent run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger

from storage.atomic import remove_stale_temporaries, write_text_atomic
from storage.errors import BadInput
from storage.leases import run_lease
from storage.location import first_line, is_remote, store_failure
from storage.store import RunPaths, Store
from storage.tracking import Tracking, finish_tracking, log_store_file, start_tracking, tag_run
from tasks.config import Config, config_yaml
from tasks.interrupts import interruption, release_frames


@contextmanager
def tracked_run(
    config: Config, store: Store, run_id: str, resume: bool
) -> Iterator[tuple[RunPaths, Tracking]]:
    """Create (or, with ``resume``, reopen) run ``run_id`` and its MLflow parent run, holding the
    run's lease (``storage.leases``: one writer per run) throughout. The run's ``status`` file
    says ``running``, then ``complete`` when the block completes, ``interrupted`` when a signal
    stops it (the MLflow parent ends KILLED), ``failed`` when it raises (FAILED)."""
    log = get_run_logger()
    run = store.run(run_id)
    run.dir.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        try:
            _create(run)
        except FileExistsError:
            raise BadInput(f"run {run_id} already exists in {store}") from None
    with run_lease(run):
        if resume:
            for path in remove_stale_temporaries(run.dir):
                log.info("removed %s, left by a writer that was killed", path.name)
        else:
            write_text_atomic(config_yaml(config), run.config)
        write_text_atomic("running", run.status)
        id_file = run.dir / "mlflow_run_id"
        previous = id_file.read_text().strip() if resume and id_file.exists() else None
        tracking = start_tracking(store, config.tracking.uri, config.tracking.experiment, run_id,
                                  previous)
        write_text_atomic(tracking.parent_run_id, id_file)
        log_store_file(tracking.client(), tracking.parent_run_id, run.config)
        log.info("run %s in %s (MLflow run %s)", run_id, store, tracking.parent_run_id)
        try:
            yield run, tracking
        except BaseException as exc:
            _record_end(run, tracking, exc)
            raise
        _record_end(run, tracking, None)


def _record_end(run: RunPaths, tracking: Tracking, error: BaseException | None) -> None:
    """End the MLflow parent run and write the run's status for ``error`` (None: complete).
    After an error this is best effort: a failure here is logged, so the error that stopped
    the run is the one reported; a store that failed is not written again."""
    status = ("complete" if error is None else
              "interrupted" if interruption(error) is not None else "failed")
    if status == "interrupted":
        release_frames(error)
    try:
        finish_tracking(tracking, {"complete": "FINISHED", "interrupted": "KILLED"}.get(
            status, "FAILED"))
        tag_run(tracking, {"sieve.status": status})
        if error is None or store_failure(error) is None:
            write_text_atomic(status, run.status)
    except Exception as exc:
        if error is None:
            raise
        get_run_logger().warning("run %s: could not record it as %s: %s", run.run_id, status,
                                 first_line(exc))


def _create(run: RunPaths) -> None:
    """Create the run's folder exclusively (concurrent runs never share one). An object store
    has no folders: there a run exists once it holds an object (ids are random, so two new
    runs never pick the same one). FileExistsError when it exists."""
    if not is_remote(run.dir):
        run.dir.mkdir()
    elif run.dir.exists():
        raise FileExistsError(str(run.dir))
