"""Sign test (spec section 11): a mislabeled sample, duplicated, must look harmful and suspect."""

from __future__ import annotations

import numpy as np
import pytest

from estimators import make_estimator

COPIES = 3


@pytest.fixture(scope="module", params=["linear", "mlp"])
def poisoned(request, mislabeled_case):
    """Train on digits where the most typical '3' is replaced by COPIES copies labelled '5'.

    linear: L2 logistic regression by L-BFGS (one checkpoint). mlp: 15-16-3 tanh MLP trained by
    minibatch SGD with weight decay, four checkpoints (TracIn sums over them).
    """
    weight_decay = {"linear": 1e-2, "mlp": 1e-3}[request.param]
    ctx = mislabeled_case(request.param, COPIES, weight_decay)
    return ctx, ctx.train_ids[-COPIES:]


@pytest.mark.parametrize("name", ["ip", "tracin", "if_exact"])
def test_mislabeled_duplicates_score_negative(poisoned, name: str) -> None:
    ctx, bad_ids = poisoned
    attribution = make_estimator(name).score(ctx)
    bad = np.isin(attribution.sample_ids, bad_ids)
    assert bad.sum() == COPIES
    assert (attribution.score[bad] < 0).all(), attribution.score[bad]


@pytest.mark.parametrize("name", ["tracin", "if_exact", "loss"])
def test_mislabeled_duplicates_are_most_suspect(poisoned, name: str) -> None:
    ctx, bad_ids = poisoned
    attribution = make_estimator(name).score(ctx)
    assert attribution.suspicion is not None
    ranking = attribution.sample_ids[np.argsort(-attribution.suspicion, kind="stable")]
    ranks = np.flatnonzero(np.isin(ranking, bad_ids))
    assert ranks.max() < COPIES + 3, f"{name}: duplicates ranked {ranks}"
