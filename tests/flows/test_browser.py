"""Where users live, in a real browser (headless Debian Chromium driven by Playwright): trigger
the pipeline deployment from its Prefect UI form with one parameter changed, see the run
complete, find it in the MLflow UI with its stage runs, a metric and the report artifact, and
read the report (summary table, plots). Screenshots go to $SIEVE_TEST_ARTIFACTS (default
test-artifacts/)/browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("SIEVE_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[2] / "test-artifacts") / "browser"
STAGES = ("train", "gradients", "score", "prune", "retrain")
UI_TIMEOUT_MS = 60_000
RUN_TIMEOUT_S = 150


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed with apt when missing (as root); skipped only when that is
    impossible, never in CI."""
    if not CHROMIUM.exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -q && apt-get install -y -q chromium", shell=True,
                       check=False, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing and could not be installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture
def page(chromium):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=UI_TIMEOUT_MS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(UI_TIMEOUT_MS)
        try:
            yield page
        finally:
            browser.close()


def test_run_from_prefect_form_lands_in_mlflow_with_report(served, page):
    from playwright.sync_api import expect

    # Prefect: the pipeline deployment's form, with the served config's values as defaults.
    page.goto(f"{served.prefect}/deployments")
    page.get_by_role("link", name="pipeline", exact=True).click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    epochs = page.locator("div.schema-form-property").filter(
        has=page.get_by_text("epochs (Optional)", exact=True)).locator("input")
    expect(epochs).to_have_value("2")
    epochs.fill("3")
    page.screenshot(path=ARTIFACTS / "1-prefect-form.png")
    epochs.fill("0")  # the form refuses a value outside the parameter's bounds
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_text(re.compile("0 is less than the minimum of 1")).first).to_be_visible()
    epochs.fill("3")
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_text("scheduled to start now").first).to_be_visible()

    run = served.wait_for_run("pipeline", lambda r: r["parameters"].get("epochs") == 3,
                              RUN_TIMEOUT_S)
    run_id = run["name"]  # the Sieve run id: the run folder, the MLflow parent run's name
    page.goto(f"{served.prefect}/runs/flow-run/{run['id']}")
    expect(page.get_by_text(run_id).first).to_be_visible()
    expect(page.get_by_text("Completed").first).to_be_visible()
    page.screenshot(path=ARTIFACTS / "2-prefect-run.png")
    assert "epochs: 3" in served.store.run(run_id).config.read_text()

    # MLflow: the parent run, its stage runs, a stage metric, the report artifact.
    experiment = MlflowClient(served.store.mlflow_uri).get_experiment_by_name("sieve")
    page.goto(f"{served.mlflow}/#/experiments/{experiment.experiment_id}/runs"
              "?workflowType=machine_learning")
    page.get_by_role("link", name=run_id).click()
    for stage in STAGES:
        expect(page.get_by_role("link", name=stage, exact=True)).to_be_visible()
    parent_url = page.url
    assistant = page.get_by_role("button", name="Close")  # MLflow's chat panel, if it opened
    if assistant.is_visible():
        assistant.click()
    page.get_by_role("link", name="train", exact=True).click()
    expect(page.get_by_text("test_accuracy", exact=True)).to_be_visible()
    epochs_row = page.get_by_role("row").filter(has=page.get_by_text("epochs", exact=True))
    expect(epochs_row.get_by_role("cell").nth(1)).to_have_text("3")  # typed into the form
    page.screenshot(path=ARTIFACTS / "3-mlflow-train-stage.png")

    page.goto(f"{parent_url.split('?')[0].rstrip('/')}/artifacts")
    page.get_by_text("report.html", exact=True).click()
    report = page.frame_locator("iframe").first
    expect(report.locator("table#summary-table")).to_contain_text("ip")
    plots = report.locator("img.plot")
    expect(plots.nth(3)).to_be_visible()
    widths = [plots.nth(i).evaluate("img => img.naturalWidth") for i in range(plots.count())]
    assert len(widths) >= 4 and min(widths) > 0, widths  # at least four plots, all decoded
    page.screenshot(path=ARTIFACTS / "4-mlflow-report.png")

    # The report itself, as a reader opens it from the run folder.
    page.goto(served.store.run(run_id).dir.joinpath("report.html").as_uri())
    expect(page.locator("table#summary-table")).to_contain_text("ip")
    assert page.locator("img.plot").count() >= 4
    page.screenshot(path=ARTIFACTS / "5-report.png", full_page=True)
