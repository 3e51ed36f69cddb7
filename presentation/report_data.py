"""What the HTML report shows, read from the store: the run's config file, metrics and
evaluation rows, and its scores and samples through the DuckDB views. The caller passes the
run's config (as validated) and the name of the target the scores were written for."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from presentation.report_figures import Boundary
from storage.atomic import read_parquet_schema
from storage.store import RunPaths
from storage.views import open_run

if TYPE_CHECKING:  # the config is passed in as a value; presentation never imports tasks
    from tasks.config import Config

EXTREMES = 8  # most harmful and most helpful samples shown per estimator

_EXTREMES_SQL = """
with ranked as (
    select estimator, sample_id, score,
           row_number() over (partition by estimator order by score asc, sample_id asc) as harm,
           row_number() over (partition by estimator order by score desc, sample_id asc) as help
    from scores where target = $target and isfinite(score)
)
select r.estimator, r.harm, r.help, r.sample_id, r.score, m.label, m.clean_label, m.corrupted,
       m."{column}"
from ranked r join samples m using (sample_id)
where r.harm <= $k or r.help <= $k
order by r.estimator, r.harm
"""

_SCORES_SQL = """
select s.score, m.corrupted
from scores s join samples m using (sample_id)
where s.target = $target and s.estimator = $estimator and isfinite(s.score)
order by s.sample_id
"""


@dataclass(frozen=True)
class SampleRow:
    """One training sample next to its score; ``features`` (f,) as stored in samples.parquet."""

    sample_id: int
    score: float
    label: int
    clean_label: int | None
    corrupted: bool | None
    features: np.ndarray


@dataclass(frozen=True)
class ReportData:
    """Everything the report renders. ``scores[e]`` (n,) is ordered by sample id and aligned
    with ``corrupted[e]``; ``corrupted`` is None when the corruption is unknown or absent."""

    run: RunPaths
    config: Config
    config_text: str  # the run's config.yaml as stored (the resolved config)
    target: str  # the scores' target partition, e.g. val_loss
    mlflow_run_id: str | None
    metrics: list[dict]
    evaluation: dict[str, dict[str, float]]
    estimators: list[str]
    scores: dict[str, np.ndarray]
    corrupted: dict[str, np.ndarray] | None
    harmful: dict[str, list[SampleRow]]
    helpful: dict[str, list[SampleRow]]
    input_shape: tuple[int, ...]
    feature_names: list[str] | None = None
    boundary: Boundary | None = None  # 2-feature data: decision regions and harmful points

    @property
    def is_evaluation(self) -> bool:
        return bool(self.evaluation)

    def plot_file(self, name: str) -> Path | None:
        """A figure a stage wrote under ``plots/`` (e.g. ``accuracy.png``), if it exists."""
        path = self.run.dir / "plots" / name
        return path if path.is_file() else None

    def stage_plots(self) -> set[str]:
        """File names of every PNG figure the stages wrote under ``plots/``."""
        folder = self.run.dir / "plots"
        return ({p.name for p in folder.glob("*.png") if not p.name.startswith(".")}
                if folder.is_dir() else set())


def read_report_data(run: RunPaths, config: Config, target: str,
                     boundary: Boundary | None = None) -> ReportData:
    """The report's data of ``run`` (its ``config``; scores of partition ``target``;
    ``boundary``: the decision-boundary figure's data when the caller made it)."""
    params = {"target": target}
    with open_run(run) as con:
        cursor = con.execute("select stage, name, value, estimator, seed, step from metrics")
        columns = [d[0] for d in cursor.description]
        metrics = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        evaluation: dict[str, dict[str, float]] = defaultdict(dict)
        for estimator, metric, value in con.execute(
                "select estimator, metric, value from evaluation").fetchall():
            evaluation[estimator][metric] = value
        found = {e for (e,) in con.execute(
            "select distinct estimator from scores where target = $target", params).fetchall()}
        order = [e.name for e in config.estimators if e.name in found]
        names = order + sorted(found - set(order))
        scores, flags = {}, {}
        for name in names:
            columns = con.execute(_SCORES_SQL, params | {"estimator": name}).fetchnumpy()
            scores[name] = np.asarray(columns["score"], dtype=np.float64)
            flags[name] = np.ma.asarray(columns["corrupted"])  # masked where unknown (null)
        sql = _EXTREMES_SQL.format(column=_first_input(run).replace('"', '""'))
        extremes = con.execute(sql, params | {"k": EXTREMES}).fetchall()
    known = bool(names) and not any(np.ma.is_masked(f) for f in flags.values())
    flags = {e: np.asarray(f, dtype=bool) for e, f in flags.items()}
    harmful: dict[str, list[SampleRow]] = defaultdict(list)
    helpful: dict[str, list[SampleRow]] = defaultdict(list)
    for estimator, harm, help_, sample_id, score, label, clean, corrupted, features in extremes:
        row = SampleRow(sample_id, score, label, clean, corrupted,
                        np.asarray(features, dtype=np.float32))
        if harm <= EXTREMES:
            harmful[estimator].append(row)
        if help_ <= EXTREMES:
            helpful[estimator].append(row)
    for rows in helpful.values():
        rows.sort(key=lambda r: (-r.score, r.sample_id))
    id_file = run.dir / "mlflow_run_id"
    return ReportData(
        run=run, config=config, config_text=run.config.read_text(), target=target,
        mlflow_run_id=id_file.read_text().strip() if id_file.exists() else None,
        metrics=metrics, evaluation=dict(evaluation), estimators=names, scores=scores,
        corrupted=flags if known and any(f.any() for f in flags.values()) else None,
        harmful=dict(harmful), helpful=dict(helpful), input_shape=_input_shape(run),
        feature_names=_feature_names(config), boundary=boundary,
    )


def _feature_names(config: Config) -> list[str] | None:
    """The user's feature column names: ``data.feature_columns``, else the columns of
    ``data.path`` other than the label, sample_id, split and group (as the loader picks them);
    None when unknown (digits, or the file is gone)."""
    d = config.data
    if d.feature_columns:
        return list(d.feature_columns)
    if d.path is None or not Path(d.path).is_file():
        return None
    try:
        names = read_parquet_schema(Path(d.path)).names
    except (OSError, pa.ArrowException):
        return None
    reserved = {d.label_column, "sample_id", "split", d.group_column or "group"}
    return [name for name in names if name not in reserved]


def _first_input(run: RunPaths) -> str:
    """The samples.parquet column of the first input (the one shown)."""
    meta = read_parquet_schema(run.samples).metadata or {}
    return next(iter(json.loads(meta.get(b"inputs", b'{"features": 0}'))))


def _input_shape(run: RunPaths) -> tuple[int, ...]:
    meta = read_parquet_schema(run.samples).metadata or {}
    text = meta.get(b"input_shape", b"").decode()
    return tuple(int(d) for d in text.split(",") if d)
