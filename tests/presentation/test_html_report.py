"""The run's HTML report (self-contained: summary table, figures, sample images; an MLflow
artifact) and the CLI's output for scripts (``--json``, ``--quiet``)."""

from __future__ import annotations

import base64
import io
import json
import logging
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from presentation.report import print_run_summary
from presentation.report_data import EXTREMES
from presentation.summaries import RunSummary
from storage.metrics import read_metrics
from storage.store import Store
from tasks.config import load_resolved_config
from tests.flows.conftest import sets

ESTIMATORS = ["random", "loss", "ip", "cosine", "tracin", "if_exact"]  # the default config's
TINY = ["model.name=logreg", "train.epochs=2", "train.checkpoints=1", "prune.seeds=1",
        "estimators=[loss,random]", "prune.by=loss", "gradients.shard_size=256"]


class _Page(HTMLParser):
    """Every start tag with its attributes, and the cell texts of table#summary-table."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.summary_rows: list[list[str]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "table":
            self._table = a.get("id")
        elif self._table == "summary-table" and tag == "tr":
            self.summary_rows.append([])
        elif self._table == "summary-table" and tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "td" and self._cell is not None:
            self.summary_rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def with_class(self, tag: str, cls: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and cls in a.get("class", "").split()]


def _page(run) -> _Page:
    path = run.dir / "report.html"
    assert path.is_file()
    return _Page(path.read_text(encoding="utf-8"))


def test_report_is_self_contained(small_run):
    _, run = small_run
    page = _page(run)
    assert not [t for t, a in page.tags if t in ("script", "link", "iframe", "object")]
    links = [a[k] for _, a in page.tags for k in ("src", "href") if k in a]
    assert links and not [v for v in links if not v.startswith(("data:", "#"))]
    for _, a in page.tags:
        if "src" in a:
            head, _, payload = a["src"].partition(",")
            assert head == "data:image/png;base64"
            assert base64.b64decode(payload, validate=True).startswith(b"\x89PNG\r\n\x1a\n")


def test_report_has_the_summary_table_and_plots(small_run):
    _, run = small_run
    page = _page(run)
    rows = [r for r in page.summary_rows if r]
    assert [r[0] for r in rows] == ESTIMATORS
    auc = {m["estimator"]: m["value"] for m in read_metrics(run.metrics).to_pylist()
           if m["stage"] == "score" and m["name"] == "detection_auc"}
    assert [r[3] for r in rows] == [f"{auc[e]:.3f}" for e in ESTIMATORS]
    plots = [a["alt"] for a in page.with_class("img", "plot")]
    assert len(plots) >= 4, plots
    assert {"score distributions", "detection ROC", "prune: accuracy"} <= set(plots)


def test_report_shows_the_most_harmful_samples_as_labelled_images(small_run, capsys):
    store, run = small_run
    page = _page(run)
    figures = page.with_class("figure", "sample")
    images = [a for t, a in page.tags if t == "img" and a.get("alt", "").startswith("sample ")]
    assert len(figures) == len(images) == 2 * EXTREMES * len(ESTIMATORS)
    capsys.readouterr()
    sql = ("select sample_id from scores where estimator = 'tracin' "
           f"order by score, sample_id limit {EXTREMES}")
    assert main(["query", "--store", str(store.root), "--format", "json", sql]) == 0
    most_harmful = [r["sample_id"] for r in json.loads(capsys.readouterr().out)]
    block = 2 * EXTREMES * ESTIMATORS.index("tracin")
    shown = images[block : block + EXTREMES]
    samples = {r["sample_id"]: r for r in pq.read_table(run.samples).to_pylist()}
    assert [int(a["alt"].split()[1].rstrip(",")) for a in shown] == most_harmful
    for figure, image in zip(figures, images, strict=True):
        sample = samples[int(image["alt"].split()[1].rstrip(","))]
        assert image["alt"].endswith(f"label {sample['label']}")
        assert ("corrupted" in figure["class"].split()) == sample["corrupted"]
    assert any("corrupted" in f["class"] for f in figures)


def test_report_is_an_mlflow_artifact_of_the_parent_run(small_run, tmp_path):
    store, run = small_run
    parent = (run.dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=store.mlflow_uri)
    assert "report.html" in [f.path for f in client.list_artifacts(parent)]
    copy = client.download_artifacts(parent, "report.html", str(tmp_path))
    with open(copy, "rb") as f:
        assert f.read() == (run.dir / "report.html").read_bytes()


def test_cli_output_links_the_report(small_run, capsys):
    store, run = small_run
    summary = RunSummary(run.run_id, str(store.root), "parent", {},
                         {"full": [0.9], "random": [0.8]}, str(run.dir / "report.html"))
    capsys.readouterr()
    print_run_summary(summary, load_resolved_config(run.config), 1.0)
    assert f"report: {(run.dir / 'report.html').as_uri()}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Store:
    """A store for the tiny runs of the --json and --quiet tests."""
    return Store(tmp_path_factory.mktemp("tiny-store"))


def _run_ids(store: Store) -> set[str]:
    return {r.run_id for r in store.list_runs()}


def test_json_prints_one_object_with_the_summary_rows(tiny_store, capsys):
    store, before = tiny_store, _run_ids(tiny_store)
    capsys.readouterr()
    assert main(["run", "--store", str(store.root), "--json", *sets(*TINY)]) == 0
    out = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object
    assert out["command"] == "run" and _run_ids(store) - before == {out["run_id"]}
    run = store.run(out["run_id"])
    assert out["report"] == str(run.dir / "report.html") and (run.dir / "report.html").is_file()
    assert [r["estimator"] for r in out["rows"]] == ["loss", "random"]
    loss = out["rows"][0]
    assert 0 <= loss["detection_auc"] <= 1 and 0 <= loss["pruned_test_accuracy_mean"] <= 1
    assert set(out["accuracy"]) == {"full", "random", "pruned:loss"}


def test_quiet_prints_only_the_run_id_and_silences_console_logs(tiny_store, capsys):
    store, before = tiny_store, _run_ids(tiny_store)
    console = io.StringIO()
    probe = logging.StreamHandler(console)  # a console handler like Prefect's and MLflow's
    probe.setLevel(logging.INFO)
    logging.getLogger().addHandler(probe)
    capsys.readouterr()
    try:
        assert main(["run", "--store", str(store.root), "--quiet", *sets(*TINY)]) == 0
    finally:
        logging.getLogger().removeHandler(probe)
    out = capsys.readouterr().out
    assert out.endswith("\n") and {out[:-1]} == _run_ids(store) - before
    assert console.getvalue() == ""
    assert probe.level == logging.INFO  # restored after the run
