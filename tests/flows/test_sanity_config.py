"""configs/sanity.yaml, made small: the run's report has the decision-boundary figure, built
from the final model and each estimator's most harmful samples (as many as are mislabeled)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from flows.cli import main
from storage.store import Store
from tasks.config import load_resolved_config
from tasks.report import GRID, boundary
from tasks.score import target_name
from tests.flows.conftest import sets

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sanity.yaml"
SMALL = ["data.sanity.n=150", "data.sanity.cluster=12", "train.epochs=40", "train.checkpoints=2",
         "estimators=[loss, ip, if_cg]", "prune.by=if_cg", "prune.seeds=1"]


def test_sanity_run_plots_the_decision_boundary(tmp_path, capsys) -> None:
    store = Store(tmp_path / "store")
    assert main(["run", "--store", str(store.root), "-c", str(CONFIG), *sets(*SMALL)]) == 0
    run = store.latest_run()
    html = (run.dir / "report.html").read_text()
    assert re.search(r'<img class="plot" alt="decision boundary" src="data:image/png;base64,'
                     r'[A-Za-z0-9+/=]{1000,}"', html)
    config = load_resolved_config(run.config)
    b = boundary(run, config, target_name(config))
    assert b is not None and b.predicted.shape == (GRID, GRID)
    assert set(b.predicted.ravel()) == {0, 1}  # both classes have a region
    assert list(b.harmful) == ["loss", "ip", "if_cg"]
    assert all(len(ids) == 12 for ids in b.harmful.values())  # k = the cluster's size
    found = {e: int(b.corrupted[np.isin(b.sample_ids, ids)].sum()) for e, ids in b.harmful.items()}
    with capsys.disabled():
        print(f"\n[sanity] mislabeled among the 12 most harmful: {found}")
    assert found["if_cg"] >= 6, found
