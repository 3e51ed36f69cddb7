"""LDS, LOO correlation and confidence intervals on cases with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from estimators.counterfactual import lds, loo_correlation, mean_ci


def test_lds_is_one_for_a_true_linear_datamodel_and_minus_one_reversed():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(50, 4))
    subsets = rng.random((30, 50)) < 0.5
    outcomes = subsets @ weights + 3.0
    np.testing.assert_allclose(lds(weights, subsets, outcomes), 1.0)
    np.testing.assert_allclose(lds(-weights, subsets, outcomes), -1.0)


def test_lds_of_noise_is_near_zero_and_constant_targets_are_nan():
    rng = np.random.default_rng(1)
    subsets = rng.random((200, 40)) < 0.5
    outcomes = rng.normal(size=(200, 2))
    outcomes[:, 1] = 1.0
    values = lds(rng.normal(size=(40, 2)), subsets, outcomes)
    assert abs(values[0]) < 0.2 and np.isnan(values[1])


def test_loo_correlation_signs():
    x = np.arange(10.0)
    assert loo_correlation(x, 2 * x + 1) == pytest.approx((1.0, 1.0))
    assert loo_correlation(x, -(x**3)) == pytest.approx((loo_correlation(x, -(x**3))[0], -1.0))
    with pytest.raises(ValueError):
        loo_correlation(x[:2], x[:2])


def test_mean_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(2)
    small = mean_ci(rng.normal(5, 1, 10))
    large = mean_ci(rng.normal(5, 1, 1000))
    assert small[1] < 5 < small[2] and large[1] < 5 < large[2]
    assert large[2] - large[1] < small[2] - small[1]
    assert np.isnan(mean_ci(np.array([np.nan]))[0])
