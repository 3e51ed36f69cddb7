"""The run's report: ``runs/<run_id>/report.html``, one self-contained file (figures inline as
base64 PNG, styles inline, no scripts, no external links), written atomically at the end of
``sieve run`` and ``sieve evaluate`` (by the ``report`` task, tasks/report.py) and logged to the
MLflow parent run as ``report.html``.

Stable hooks for readers and browser tests: ``table#summary-table`` (one row per estimator),
``img.plot`` (the figures), ``figure.sample`` (a training sample, inside ``#samples``).
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from estimators.metrics import sample_sd
from presentation.report_data import ReportData, SampleRow, read_report_data
from presentation.report_figures import (
    Boundary,
    decision_boundaries,
    detection_roc,
    found_curves,
    loss_curve,
    sample_image,
    score_histograms,
)
from storage.atomic import write_text_atomic
from storage.store import RunPaths

if TYPE_CHECKING:  # the config is passed in as a value; presentation never imports tasks
    from tasks.config import Config

REPORT_FILE = "report.html"
_MAX_FEATURES = 16  # columns shown per tabular sample
_NUM = ' class="num"'
# Figures the stages write under plots/ (title, caption), in report order; any other PNG there
# follows, titled by its file name.
_STAGE_PLOTS = {
    "accuracy.png": ("prune: accuracy", "Retrained test accuracy: full data, random removal "
                     "and removal of the most harmful samples (mean ± sd over seeds)."),
    "prune_curves.png": ("prune curves", "Test accuracy after removing the q most harmful "
                         "samples, against random removal of as many."),
    "lds.png": ("LDS", "Linear datamodeling score per estimator, with its 95% interval."),
}

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e5e5e5; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.overview { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; }
dl.overview dt { color: #666; } dl.overview dd { margin: 0; }
.plots { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure.plot-figure { margin: 0; } figure.plot-figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; max-width: 640px; }
.samples { display: flex; flex-wrap: wrap; gap: 0.6em; }
figure.sample { margin: 0; width: 92px; text-align: center; font-size: 0.78em; }
figure.sample img { width: 80px; height: 80px; image-rendering: pixelated;
                    border: 1px solid #ccc; }
figure.sample.corrupted img { border: 2px solid #c33; }
.corrupted-text { color: #c33; font-weight: 600; }
details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: 600; }
pre { background: #f7f7f7; padding: 0.8em; overflow: auto; }
"""


def report_path(run: RunPaths) -> Path:
    return run.dir / REPORT_FILE


def write_report(run: RunPaths, config: Config, target: str,
                 boundary: Boundary | None = None) -> Path:
    """Render the run's report from the store (``config``: the run's; ``target``: the scores'
    partition; ``boundary``: a 2-feature model's decision regions) and write it atomically;
    returns its path."""
    path = report_path(run)
    write_text_atomic(render_report(read_report_data(run, config, target, boundary)), path)
    return path


def render_report(data: ReportData) -> str:
    kind = "sieve evaluate" if data.is_evaluation else "sieve run"
    title = f"{kind} {data.run.run_id}"
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>", _overview(data),
        '<section id="summary"><h2>Summary</h2>', _summary(data), "</section>",
        '<section id="plots"><h2>Plots</h2><div class="plots">',
        *(_plot(name, caption, png) for name, caption, png in _plots(data)),
        "</div></section>", _samples_section(data),
        '<section id="config"><h2>Config</h2><details><summary>config.yaml (resolved)</summary>',
        f"<pre>{_e(data.config_text)}</pre></details></section>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _mean_sd(values: list[float]) -> str:
    """``mean ± sd`` in percent (sample sd, ddof=1; "–" for the sd of one value)."""
    if not values:
        return "–"
    sd = sample_sd(values)
    return f"{100 * np.mean(values):.2f} ± {'–' if np.isnan(sd) else f'{100 * sd:.2f}'}"


def _delta(values: list[float], reference: list[float]) -> str:
    if not values or not reference:
        return "–"
    return f"{100 * (np.mean(values) - np.mean(reference)):+.2f}"


def _by_estimator(data: ReportData, stage: str) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = defaultdict(dict)
    for m in data.metrics:
        if m["stage"] == stage and m["estimator"] is not None and m["seed"] is None:
            rows[m["estimator"]][m["name"]] = m["value"]
    return rows


def _overview(data: ReportData) -> str:
    c = data.config
    train = {m["name"]: m["value"] for m in data.metrics
             if m["stage"] == "train" and m["name"].endswith("_accuracy")}
    items = [
        ("data", f"{c.data.path or c.data.name} (label noise {c.data.noise:g})"),
        ("model", c.model.factory or c.model.name),
        ("estimators", ", ".join(data.estimators) or "–"),
        ("target", data.target),
        ("accuracy after training", ", ".join(
            f"{split} {100 * train[f'{split}_accuracy']:.2f}%"
            for split in ("train", "val", "test") if f"{split}_accuracy" in train) or "–"),
        ("run folder", str(data.run.dir)),
        ("MLflow parent run", data.mlflow_run_id or "–"),
    ]
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    return f'<dl class="overview">{rows}</dl>'


def _table(columns: list[str], rows: list[list[str]], skipped: dict[str, str]) -> str:
    """The summary table; ``skipped`` estimators get one row each: ``skipped: <reason>``."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td{'' if i == 0 else _NUM}>{_e(v)}</td>"
                         for i, v in enumerate(row)) + "</tr>"
        for row in rows
    ) + "".join(
        f'<tr class="skipped"><td>{_e(name)}</td><td colspan="{len(columns) - 1}">'
        f"{_e('skipped: ' + reason)}</td></tr>"
        for name, reason in skipped.items()
    )
    return f'<table id="summary-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _summary(data: ReportData) -> str:
    return _evaluation_summary(data) if data.is_evaluation else _run_summary(data)


def _run_summary(data: ReportData) -> str:
    score, prune = _by_estimator(data, "score"), _by_estimator(data, "prune")
    arms: dict[str, list[float]] = defaultdict(list)
    for m in data.metrics:
        if m["stage"] == "retrain" and m["name"] == "test_accuracy":
            arms[m["estimator"]].append(m["value"])
    full, random = arms.get("full", []), arms.get("random", [])
    columns = ["estimator", "seconds", "peak MiB", "detection AUC (−score)", "precision@k",
               "suspicion AUC", "removed: corrupted %", "test acc % pruned", "vs full",
               "vs random"]
    rows = []
    for name in data.estimators:
        s, p, pruned = score.get(name, {}), prune.get(name, {}), arms.get(f"pruned:{name}", [])
        corrupted = p.get("removed_corrupted_fraction")
        rows.append([
            name, _num(s.get("seconds"), 2), _num(s.get("peak_mb"), 1),
            _num(s.get("detection_auc")), _num(s.get("precision_at_k")),
            _num(s.get("suspicion_auc")),
            _num(None if corrupted is None else 100 * corrupted, 1),
            _mean_sd(pruned), _delta(pruned, full) if pruned else "–",
            _delta(pruned, random) if pruned else "–",
        ])
    note = (f"Test accuracy %, mean ± sd over {len(full)} seeds: full data {_mean_sd(full)}, "
            f"random removal of {100 * data.config.prune.fraction:g}% {_mean_sd(random)}. "
            "“vs” columns are differences in percentage points. precision@k: share of "
            "corrupted samples among the k most harmful, k = number corrupted.")
    return _table(columns, rows, data.config.skipped) + f"<p>{_e(note)}</p>"


def _evaluation_summary(data: ReportData) -> str:
    fractions = data.config.evaluate.prune_curve.fractions
    q = min(fractions, key=lambda f: abs(f - 0.10))
    columns = ["estimator", "LDS (95% CI)", "fresh-seed LDS (95% CI)", "LOO Pearson",
               "LOO Spearman", "detection AUC", "found in top 10%",
               f"prune gain @{100 * q:g}% (pts)", "seconds", "pairwise seconds", "peak MiB"]
    rows = []
    for name in data.estimators:
        r = data.evaluation.get(name, {})
        lds, fresh = ((f"{r[k]:.3f} [{r[k + '_low']:.3f}, {r[k + '_high']:.3f}]" if k in r
                       else "–") for k in ("lds", "lds_fresh"))
        gain = r.get(f"prune_gain@{q}")
        rows.append([name, lds, fresh, _num(r.get("loo_pearson")), _num(r.get("loo_spearman")),
                     _num(r.get("detection_auc")), _num(r.get("found_top10")),
                     _num(None if gain is None else 100 * gain, 2), _num(r.get("seconds"), 2),
                     _num(r.get("pairwise_seconds"), 2), _num(r.get("peak_mb"), 1)])
    full = data.evaluation.get("full_data", {}).get("test_accuracy")
    rand = data.evaluation.get("random_removal", {}).get(f"prune_accuracy@{q}")
    note = (f"Test accuracy: full data {_num(None if full is None else 100 * full, 2)}%, "
            f"random removal of {100 * q:g}% {_num(None if rand is None else 100 * rand, 2)}%.")
    return _table(columns, rows, data.config.skipped) + f"<p>{_e(note)}</p>"


def _plots(data: ReportData) -> list[tuple[str, str, bytes]]:
    """(title, caption, PNG) of every figure this run has."""
    plots = []
    steps = sorted((m["step"], m["value"]) for m in data.metrics
                   if m["stage"] == "train" and m["name"] == "loss" and m["step"] is not None)
    if steps:
        s = np.array(steps)
        plots.append(("training loss", "Cross-entropy of every optimizer step of the attributed "
                      "model.", loss_curve(s[:, 0], s[:, 1])))
    stored = data.plot_file("score_distributions.png")
    if stored is not None:
        plots.append(("score distributions", "Scores of clean vs corrupted training samples, "
                      "per estimator (score > 0 helps the target).", stored.read_bytes()))
    elif data.scores:
        plots.append(("score distributions", "Scores of the training samples, per estimator "
                      "(score > 0 helps the target).", score_histograms(data.scores)))
    if data.corrupted is not None:
        plots.append(("detection ROC", "Finding the corrupted labels by ranking −score: ROC "
                      "curve per estimator.", detection_roc(data.scores, data.corrupted)))
        plots.append(("corrupted found", "Share of all corrupted samples among the q most "
                      "harmful, per estimator.", found_curves(data.scores, data.corrupted)))
    if data.boundary is not None and data.boundary.harmful:
        plots.append(("decision boundary", "The trained model's decision regions over the 2 "
                      "features, the training points by label (mislabeled ones outlined in red) "
                      "and, circled, each estimator's most harmful training samples (as many as "
                      "are mislabeled).", decision_boundaries(data.boundary)))
    known = list(_STAGE_PLOTS)
    others = sorted(data.stage_plots() - set(known) - {"score_distributions.png"})
    for name in known + others:
        stored = data.plot_file(name)
        if stored is not None:
            title, caption = _STAGE_PLOTS.get(
                name, (Path(name).stem.replace("_", " "), f"plots/{name} of this run."))
            plots.append((title, caption, stored.read_bytes()))
    return plots


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _plot(title: str, caption: str, png: bytes) -> str:
    return (f'<figure class="plot-figure"><img class="plot" alt="{_e(title)}" '
            f'src="{_data_uri(png)}"><figcaption><b>{_e(title)}</b>: {_e(caption)}'
            "</figcaption></figure>")


def _image_shape(data: ReportData, width: int) -> tuple[int, ...] | None:
    """(H, W) or (H, W, 3) when the samples are images, else None (tabular rows)."""
    shape = data.input_shape
    if int(np.prod(shape or (0,))) != width:
        return None
    if len(shape) == 2:
        return shape
    if len(shape) == 3 and shape[0] in (1, 3) and shape[1] * shape[2] > 1:
        return shape[1:] if shape[0] == 1 else (shape[1], shape[2], 3)
    return None


def _samples_section(data: ReportData) -> str:
    if not data.harmful:
        return ""
    pruned_by = [e for e in data.config.prune.by if e in data.harmful]
    opened = set(pruned_by or data.estimators[:1])
    parts = ['<section id="samples"><h2>Most harmful and most helpful training samples</h2>',
             "<p>Per estimator: the training samples whose removal is predicted to lower the "
             "target loss most (harmful, most negative score first) and to raise it most "
             "(helpful). Corrupted samples (label flipped by the noise) are outlined in red.</p>"]
    for name in data.estimators:
        if name not in data.harmful:
            continue
        parts.append(f"<details{' open' if name in opened else ''}><summary>{_e(name)}</summary>")
        for heading, rows in (("most harmful", data.harmful[name]),
                              ("most helpful", data.helpful.get(name, []))):
            parts.append(f"<h3>{_e(heading)}</h3>{_sample_rows(data, rows)}")
        parts.append("</details>")
    parts.append("</section>")
    return "\n".join(parts)


def _sample_rows(data: ReportData, rows: list[SampleRow]) -> str:
    if not rows:
        return "<p>–</p>"
    shape = _image_shape(data, len(rows[0].features))
    if shape is None:
        return _feature_table(data, rows)
    values = np.concatenate([r.features for r in rows])
    low, high = float(values.min()), float(values.max())
    if data.config.data.name == "digits":
        low, high = 0.0, 1.0
    figures = []
    for r in rows:
        pixels = r.features.reshape(shape[2], shape[0], shape[1]).transpose(1, 2, 0) \
            if len(shape) == 3 else r.features.reshape(shape)
        label = f"label {r.label}"
        if r.corrupted:
            label += f' <span class="corrupted-text">(clean {r.clean_label})</span>'
        figures.append(
            f'<figure class="sample{" corrupted" if r.corrupted else ""}">'
            f'<img alt="sample {r.sample_id}, label {r.label}" '
            f'src="{_data_uri(sample_image(pixels, low, high))}">'
            f"<figcaption>#{r.sample_id}<br>{label}<br>score {r.score:.3g}</figcaption></figure>")
    return f'<div class="samples">{"".join(figures)}</div>'


def _feature_table(data: ReportData, rows: list[SampleRow]) -> str:
    width = len(rows[0].features)
    given = data.feature_names
    names = given if given and len(given) == width else [f"x{i}" for i in range(width)]
    shown = min(width, _MAX_FEATURES)
    more = f"<th>… {width - shown} more</th>" if width > shown else ""
    head = "".join(f"<th>{_e(c)}</th>" for c in
                   ["sample", "score", "label", "clean label", *names[:shown]]) + more
    body = []
    for r in rows:
        cells = [str(r.sample_id), f"{r.score:.3g}", str(r.label),
                 "–" if r.clean_label is None else str(r.clean_label),
                 *(f"{v:.4g}" for v in r.features[:shown])]
        cls = ' class="corrupted-text"' if r.corrupted else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(v)}</td>" for v in cells)
                    + ("<td></td>" if more else "") + "</tr>")
    return (f'<table class="sample-rows"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")
