"""Train x target attributions of the inner-product family and exact IF: each column is the
estimator's score for one target sample, so the columns sum to the summed-target score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from estimators import make_estimator


@pytest.fixture(scope="module")
def ctx(kit, digits):
    x = torch.as_tensor(digits["train_x"][:120])
    y = torch.as_tensor(digits["train_y"][:120])
    checkpoints = []
    torch.manual_seed(0)
    model = kit.mlp_factory()()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(3):
        for start in range(0, 120, 20):
            loss = torch.nn.functional.cross_entropy(model(x[start:start + 20]),
                                                     y[start:start + 20])
            opt.zero_grad()
            loss.backward()
            opt.step()
        checkpoints.append(kit.snapshot(model, epoch, (epoch + 1) * 6, 0.1 / (epoch + 1)))
    return kit.make_context(kit.mlp_factory(), checkpoints, digits["train_x"][:120],
                            digits["train_y"][:120], digits["test_x"][:25], digits["test_y"][:25],
                            weight_decay=1e-3)


@pytest.mark.parametrize("name", ["ip", "tracin", "if_exact"])
def test_columns_sum_to_the_summed_target_score(ctx, name):
    estimator = make_estimator(name)
    train_ids, target_ids, matrix = estimator.pairwise(ctx)
    summed = estimator.score(ctx)
    assert matrix.shape == (len(ctx.train_ids), 25)
    assert len(target_ids) == 25
    np.testing.assert_array_equal(train_ids, summed.sample_ids)
    np.testing.assert_allclose(matrix.sum(axis=1), summed.score, rtol=1e-8, atol=1e-10)


def test_cosine_columns_are_cosines(ctx):
    _, _, matrix = make_estimator("cosine").pairwise(ctx)
    assert np.abs(matrix).max() <= 1 + 1e-9
    assert np.abs(matrix).max() > 0.5
