"""Honest spreads: every "± sd" over seeds is the sample sd (ddof=1), undefined for one seed."""

from __future__ import annotations

import json
import math

import numpy as np

from estimators.metrics import sample_sd
from presentation.html_report import _mean_sd as html_mean_sd
from presentation.json_summary import summary_json
from presentation.report import _mean_sd
from presentation.summaries import MultistageSummary, RunSummary

SEEDS = [0.90, 0.92, 0.97]


def test_sample_sd_is_ddof_1() -> None:
    expected = math.sqrt(sum((v - np.mean(SEEDS)) ** 2 for v in SEEDS) / 2)
    assert math.isclose(sample_sd(SEEDS), expected)
    assert sample_sd(SEEDS) > np.std(SEEDS)  # the population sd is ~18 % low at n = 3
    assert math.isnan(sample_sd([0.9])) and math.isnan(sample_sd([]))


def test_tables_print_the_sample_sd_and_a_dash_for_one_seed() -> None:
    sd = 100 * sample_sd(SEEDS)
    assert _mean_sd(SEEDS) == f"{100 * np.mean(SEEDS):.2f} ± {sd:.2f}"
    assert html_mean_sd(SEEDS) == _mean_sd(SEEDS)
    assert _mean_sd([0.9]) == "90.00 ± –" and html_mean_sd([0.9]) == "90.00 ± –"


def test_json_and_multistage_rows_use_the_sample_sd() -> None:
    run = RunSummary("r", "s", "m", estimators={"ip": {"seconds": 1.0}},
                     accuracy={"full": SEEDS, "pruned:ip": SEEDS, "random": [0.9]})
    row = json.loads(summary_json(run, 1.0))["rows"][0]
    assert math.isclose(row["pruned_test_accuracy_sd"], sample_sd(SEEDS))
    one = RunSummary("r", "s", "m", estimators={"ip": {}}, accuracy={"pruned:ip": [0.9]})
    assert json.loads(summary_json(one, 1.0))["rows"][0]["pruned_test_accuracy_sd"] is None
    ms = MultistageSummary("r", "s", "m", arms={"full": {"test_loss": SEEDS}})
    assert math.isclose(ms.table["arm:full"]["test_loss_sd"], sample_sd(SEEDS))
