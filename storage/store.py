"""The store: one folder holding every run, and the paths inside a run (see ARCHITECTURE.md)."""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from storage.errors import BadInput
from storage.location import StorePath, is_remote, local_folder, location, resolved

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_GENERATED_ID = re.compile(r"^(\d{8}-\d{6})-[0-9a-f]{6}$")
_ID_TIME_FORMAT = "%Y%m%d-%H%M%S"


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a safe single path component, else raise BadInput.

    Safe: 1-64 characters of ``A-Za-z0-9._-``, starting with a letter or digit, without ``..``.
    Used for run ids and for the estimator/target/split names that become partition folders.
    """
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise BadInput(
            f"invalid {what} {value!r}: use 1-64 characters of A-Za-z0-9._- starting with a "
            "letter or digit"
        )
    return value


@dataclass(frozen=True)
class RunPaths:
    """Paths of one run (``runs/<run_id>``, local or a URL); nothing here touches the disk."""

    run_id: str
    dir: StorePath

    @property
    def config(self) -> StorePath:
        return self.dir / "config.yaml"

    @property
    def status(self) -> StorePath:
        """One word: running, complete, failed or interrupted (``RUN_STATUSES``)."""
        return self.dir / "status"

    @property
    def samples(self) -> StorePath:
        return self.dir / "samples.parquet"

    @property
    def checkpoints_dir(self) -> StorePath:
        return self.dir / "checkpoints"

    @property
    def checkpoint_index(self) -> StorePath:
        return self.checkpoints_dir / "index.parquet"

    @property
    def metrics(self) -> StorePath:
        return self.dir / "metrics.parquet"

    @property
    def evaluation(self) -> StorePath:
        """Counterfactual evaluation results (estimator, metric, value)."""
        return self.dir / "evaluation.parquet"

    @property
    def gradients_root(self) -> StorePath:
        return self.dir / "gradients"

    @property
    def scores_root(self) -> StorePath:
        return self.dir / "scores"

    @property
    def attributions_root(self) -> StorePath:
        return self.dir / "attributions"

    def gradients_dir(self, checkpoint: int, split: str) -> StorePath:
        """``gradients/checkpoint=<c>/split=<s>``; BadInput on an unsafe split name."""
        if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 0:
            raise ValueError(f"checkpoint must be a non-negative int, got {checkpoint!r}")
        split = check_name(split, "split name")
        return self.gradients_root / f"checkpoint={checkpoint}" / f"split={split}"

    def scores_dir(self, estimator: str, target: str) -> StorePath:
        """``scores/estimator=<e>/target=<t>``; BadInput on unsafe names."""
        estimator = check_name(estimator, "estimator name")
        target = check_name(target, "target name")
        return self.scores_root / f"estimator={estimator}" / f"target={target}"

    def attributions_dir(self, estimator: str) -> StorePath:
        """``attributions/estimator=<e>``; BadInput on an unsafe name."""
        return self.attributions_root / f"estimator={check_name(estimator, 'estimator name')}"


class Store:
    """A store: ``runs/`` (and the retrain cache ``retrains/``) under an absolute root, a local
    folder or an fsspec URL (e.g. ``s3://bucket/prefix``); ``mlflow.db``, ``mlartifacts/`` and
    the locks under its local folder (the root itself when local, see ``location.local_folder``).
    BadInput for a URL whose protocol fsspec cannot open."""

    def __init__(self, root: str | Path) -> None:
        self.root: StorePath = resolved(root)

    @classmethod
    def default(cls) -> Store:
        """The store named by env ``SIEVE_STORE``, else ``./sieve-store``."""
        return cls(os.environ.get("SIEVE_STORE") or "sieve-store")

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def __str__(self) -> str:
        return location(self.root)

    @property
    def local_dir(self) -> Path:
        """Where what cannot live in an object store goes (MLflow's sqlite, Prefect's home,
        locks): the root of a local store, else the URL's local folder."""
        return local_folder(self.root)

    def check_reachable(self) -> None:
        """BadInput (one line) when a URL store's bucket (or top folder) cannot be listed:
        unknown bucket, wrong endpoint or credentials. A local store is always reachable."""
        if not is_remote(self.root):
            return
        top = self.root.path.lstrip("/").split("/", 1)[0]
        self.root.fs.invalidate_cache()  # ask the store, not fsspec's listings of it
        try:
            self.root.fs.info(top)
        except FileNotFoundError:
            raise BadInput(f"store {self} is not reachable: {top} does not exist") from None
        except Exception as e:  # botocore/aiohttp/fsspec errors have no common base
            text = str(e).strip()
            reason = text.splitlines()[0] if text else type(e).__name__
            raise BadInput(f"store {self} is not reachable: {reason}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def runs_dir(self) -> StorePath:
        return self.root / "runs"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.local_dir.as_posix()}/mlflow.db"

    @property
    def artifact_root(self) -> Path:
        return self.local_dir / "mlartifacts"

    @staticmethod
    def new_run_id() -> str:
        """A fresh id ``YYYYmmdd-HHMMSS-xxxxxx`` (UTC time, 6 random hex digits)."""
        return f"{datetime.now(UTC).strftime(_ID_TIME_FORMAT)}-{secrets.token_hex(3)}"

    def run(self, run_id: str) -> RunPaths:
        """Paths of run ``run_id`` (need not exist yet); BadInput on an unsafe id."""
        run_id = check_name(run_id, "run id")
        return RunPaths(run_id=run_id, dir=self.runs_dir / run_id)

    def existing_run(self, run_id: str) -> RunPaths:
        """Like ``run`` but BadInput ``no run X in STORE`` when its folder does not exist."""
        run = self.run(run_id)
        if not run.dir.is_dir():
            raise BadInput(f"no run {run_id} in {self}")
        return run

    def list_runs(self) -> list[RunPaths]:
        """Every run folder, oldest first.

        Generated ids sort by the time they encode; other (user-chosen) ids by their folder's
        modification time; ties by id.
        """
        if not self.runs_dir.is_dir():
            return []
        keyed = []
        for entry in self.runs_dir.iterdir():
            if entry.is_dir() and _NAME.match(entry.name) and ".." not in entry.name:
                keyed.append((_created(entry), entry.name))
        return [self.run(name) for _, name in sorted(keyed)]

    def latest_run(self) -> RunPaths:
        """The newest run; BadInput when the store has none."""
        runs = self.list_runs()
        if not runs:
            raise BadInput(f"no runs in {self}")
        return runs[-1]


def _created(run_dir: StorePath) -> float:
    """Creation time of a run: from a generated id, else the folder's mtime (epoch seconds;
    in an object store, which has no folders, its config.yaml's)."""
    m = _GENERATED_ID.match(run_dir.name)
    if m:
        try:
            return datetime.strptime(m.group(1), _ID_TIME_FORMAT).replace(tzinfo=UTC).timestamp()
        except ValueError:
            pass
    if is_remote(run_dir):
        config = run_dir / "config.yaml"
        return config.stat().st_mtime if config.is_file() else 0.0
    return run_dir.stat().st_mtime
