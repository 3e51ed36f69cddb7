"""Noisy-label detection metrics on hand-made rankings."""

from __future__ import annotations

import numpy as np
import pytest

from estimators.metrics import detection_auc, found_fraction, precision_at_k

#                       0    1    2    3    4    5    6    7    8    9
SUSPICION = np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.0, 0.5, 0.4])
CORRUPTED = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 1])
# ranking by suspicion: 0(c) 2 4(c) 6 8 9(c) 3 5 1 7


def test_detection_auc() -> None:
    # of the 3 x 7 (corrupted, clean) pairs, sample 0 outranks all 7 clean samples, sample 4 six
    # (all but 0.8) and sample 9 four (0.1, 0.3, 0.2, 0.0)
    assert detection_auc(SUSPICION, CORRUPTED) == pytest.approx((7 + 6 + 4) / 21)
    assert detection_auc(CORRUPTED.astype(float), CORRUPTED) == 1.0
    assert detection_auc(-CORRUPTED.astype(float), CORRUPTED.astype(bool)) == 0.0
    with pytest.raises(ValueError, match="both"):
        detection_auc(SUSPICION, np.zeros(10))


def test_precision_at_k() -> None:
    assert precision_at_k(SUSPICION, CORRUPTED, 1) == 1.0
    assert precision_at_k(SUSPICION, CORRUPTED, 3) == pytest.approx(2 / 3)
    assert precision_at_k(SUSPICION, CORRUPTED, 6) == pytest.approx(3 / 6)
    assert precision_at_k(SUSPICION, CORRUPTED, 10) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        precision_at_k(SUSPICION, CORRUPTED, 0)


def test_found_fraction() -> None:
    assert found_fraction(SUSPICION, CORRUPTED, 0.1) == pytest.approx(1 / 3)
    assert found_fraction(SUSPICION, CORRUPTED, 0.3) == pytest.approx(2 / 3)
    assert found_fraction(SUSPICION, CORRUPTED, 0.55) == pytest.approx(1.0)  # ceil(5.5) = 6
    assert found_fraction(SUSPICION, CORRUPTED, 1.0) == 1.0
    with pytest.raises(ValueError):
        found_fraction(SUSPICION, CORRUPTED, 0.0)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="shapes"):
        detection_auc(SUSPICION, CORRUPTED[:5])
