"""What every flow does first: the run folder, its resolved config, the MLflow parent run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger

from storage.atomic import remove_stale_temporaries, write_text_atomic
from storage.errors import BadInput
from storage.location import is_remote
from storage.store import RunPaths, Store
from storage.tracking import Tracking, finish_tracking, log_store_file, start_tracking, tag_run
from tasks.config import Config, config_yaml


@contextmanager
def tracked_run(
    config: Config, store: Store, run_id: str, resume: bool
) -> Iterator[tuple[RunPaths, Tracking]]:
    """Create (or, with ``resume``, reopen) run ``run_id`` and its MLflow parent run; the parent
    is marked FINISHED when the block completes, FAILED when it raises."""
    log = get_run_logger()
    run = store.run(run_id)
    run.dir.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        for path in remove_stale_temporaries(run.dir):
            log.info("removed %s, left by a writer that was killed", path.name)
    else:
        try:
            _create(run)
        except FileExistsError:
            raise BadInput(f"run {run_id} already exists in {store}") from None
        write_text_atomic(config_yaml(config), run.config)
    id_file = run.dir / "mlflow_run_id"
    previous = id_file.read_text().strip() if resume and id_file.exists() else None
    tracking = start_tracking(store, config.tracking.uri, config.tracking.experiment, run_id,
                              previous)
    write_text_atomic(tracking.parent_run_id, id_file)
    log_store_file(tracking.client(), tracking.parent_run_id, run.config)
    log.info("run %s in %s (MLflow run %s)", run_id, store, tracking.parent_run_id)
    ok = False
    try:
        yield run, tracking
        ok = True
    finally:
        finish_tracking(tracking, ok)
    tag_run(tracking, {"sieve.status": "complete"})


def _create(run: RunPaths) -> None:
    """Create the run's folder exclusively (concurrent runs never share one). An object store
    has no folders: there a run exists once it holds an object (ids are random, so two new
    runs never pick the same one). FileExistsError when it exists."""
    if not is_remote(run.dir):
        run.dir.mkdir()
    elif run.dir.exists():
        raise FileExistsError(str(run.dir))
