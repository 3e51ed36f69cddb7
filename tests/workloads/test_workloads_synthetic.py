"""The synthetic workload: seeded, the same rows however they are asked for, learnable."""

from __future__ import annotations

import numpy as np
import pytest

from storage.errors import BadInput
from tasks.config import load_config
from tasks.train import load_samples
from workloads.synthetic import BLOCK, SyntheticSpec, load_synthetic, synthetic_rows

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def test_rows_do_not_depend_on_how_they_are_cut() -> None:
    spec = SyntheticSpec(n=BLOCK + 5_000, input_dim=4, classes=3, seed=7)
    x, y = synthetic_rows(spec, 0, spec.n)
    assert x.shape == (spec.n, 4) and x.dtype == np.float32 and y.dtype == np.int64
    for start, stop in ((0, 10), (BLOCK - 3, BLOCK + 4), (BLOCK + 4_000, spec.n), (9, 9)):
        xs, ys = synthetic_rows(spec, start, stop)
        np.testing.assert_array_equal(xs, x[start:stop])
        np.testing.assert_array_equal(ys, y[start:stop])
    again, _ = synthetic_rows(SyntheticSpec(n=spec.n, input_dim=4, classes=3, seed=7), 0, 100)
    other, _ = synthetic_rows(SyntheticSpec(n=spec.n, input_dim=4, classes=3, seed=8), 0, 100)
    np.testing.assert_array_equal(again, x[:100])
    assert not np.allclose(other, x[:100])
    with pytest.raises(ValueError):
        synthetic_rows(spec, 5, spec.n + 1)


def test_classes_are_balanced_and_separable() -> None:
    spec = SyntheticSpec(n=6_000, input_dim=16, classes=5, seed=0)
    samples = load_synthetic(spec, FRACTIONS)
    counts = np.bincount(samples.label, minlength=5)
    assert counts.min() > 0.8 * spec.n / 5
    assert {s: len(samples.indices(s)) for s in ("train", "val", "test")} == {
        "train": 3_600, "val": 1_200, "test": 1_200}
    # a nearest-class-mean rule fitted on train is far above chance on test
    train, test = samples.indices("train"), samples.indices("test")
    means = np.stack([samples.x[train][samples.label[train] == c].mean(0) for c in range(5)])
    guess = ((samples.x[test][:, None, :] - means) ** 2).sum(-1).argmin(1)
    assert (guess == samples.label[test]).mean() > 0.8


def test_config_selects_the_synthetic_workload() -> None:
    config = load_config(None, ["data.name=synthetic", "data.synthetic.n=500",
                                "data.synthetic.input_dim=6", "data.synthetic.classes=3",
                                "data.noise=0.1"])
    samples = load_samples(config)
    assert samples.x.shape == (500, 6) and samples.num_classes == 3
    assert samples.corrupted.sum() == round(0.1 * len(samples.indices("train")))
    with pytest.raises(BadInput, match="synthetic.classes"):
        load_config(None, ["data.name=synthetic", "data.synthetic.classes=1"])
