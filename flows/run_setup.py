"""What every flow does first: the run folder, its resolved config, the MLflow parent run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger

from storage.atomic import remove_stale_temporaries, write_text_atomic
from storage.errors import BadInput
from storage.store import RunPaths, Store
from storage.tracking import Tracking, finish_tracking, start_tracking, tag_run
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
            run.dir.mkdir()  # exclusive: concurrent runs never share a folder
        except FileExistsError:
            raise BadInput(f"run {run_id} already exists in {store.root}") from None
        write_text_atomic(config_yaml(config), run.config)
    id_file = run.dir / "mlflow_run_id"
    previous = id_file.read_text().strip() if resume and id_file.exists() else None
    tracking = start_tracking(store, config.tracking.uri, config.tracking.experiment, run_id,
                              previous)
    write_text_atomic(tracking.parent_run_id, id_file)
    tracking.client().log_artifact(tracking.parent_run_id, str(run.config))
    log.info("run %s in %s (MLflow run %s)", run_id, store.root, tracking.parent_run_id)
    ok = False
    try:
        yield run, tracking
        ok = True
    finally:
        finish_tracking(tracking, ok)
    tag_run(tracking, {"sieve.status": "complete"})
