"""workloads.sanity: the IP paper's 2-D sanity data, a mislabeled cluster inside class 0."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from workloads.sanity import SanitySpec, load_sanity

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_cluster_is_mislabeled_training_data_inside_class_0(kind) -> None:
    s = load_sanity(SanitySpec(kind, n=200, cluster=15, seed=3), FRACTIONS)
    assert s.x.shape == (215, 2) and s.x.dtype == np.float32 and s.input_shape == (2,)
    bad = s.corrupted
    assert bad.sum() == 15 and (s.split[bad] == "train").all()
    assert (s.label[bad] == 1).all() and (s.clean_label[bad] == 0).all()
    assert (s.label[~bad] == s.clean_label[~bad]).all()
    # the cluster is tight and its nearest clean neighbours are class 0
    centre = s.x[bad].mean(0)
    assert np.linalg.norm(s.x[bad] - centre, axis=1).max() < 0.8
    clean = np.flatnonzero(~bad)
    nearest = clean[np.argsort(np.linalg.norm(s.x[clean] - centre, axis=1))[:10]]
    assert (s.clean_label[nearest] == 0).mean() >= 0.8


def test_linear_is_linearly_separable_and_moons_are_not() -> None:
    scores = {}
    for kind in ("linear", "nonlinear"):
        s = load_sanity(SanitySpec(kind, n=400, cluster=0), FRACTIONS)
        scores[kind] = LogisticRegression().fit(s.x, s.label).score(s.x, s.label)
    assert scores["linear"] > 0.95 and scores["nonlinear"] < 0.92, scores


def test_seeded() -> None:
    a = load_sanity(SanitySpec(seed=1), FRACTIONS)
    np.testing.assert_array_equal(a.x, load_sanity(SanitySpec(seed=1), FRACTIONS).x)
    assert not np.array_equal(a.x, load_sanity(SanitySpec(seed=2), FRACTIONS).x)


def test_bad_spec() -> None:
    with pytest.raises(ValueError, match="kind"):
        SanitySpec(kind="spiral")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n >= 10"):
        SanitySpec(n=5)
