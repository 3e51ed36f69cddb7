"""Sign test (spec section 11): a mislabeled sample, duplicated, must look harmful and suspect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from estimators import make_estimator

COPIES = 3


@pytest.fixture(scope="module", params=["linear", "mlp"])
def poisoned(request, digits, kit):
    """Train on digits where the most typical '3' is replaced by COPIES copies labelled '5'.

    linear: L2 logistic regression by L-BFGS (one checkpoint). mlp: 15-16-3 tanh MLP trained by
    minibatch SGD with weight decay, four checkpoints (TracIn sums over them).
    """
    x, y = digits["train_x"], digits["train_y"]
    threes = np.flatnonzero(y == 0)
    typical = threes[np.argmin(((x[threes] - x[threes].mean(0)) ** 2).sum(1))]
    x = np.concatenate([np.delete(x, typical, 0), np.repeat(x[typical : typical + 1], COPIES, 0)])
    y = np.concatenate([np.delete(y, typical), np.full(COPIES, 1)])
    bad = np.arange(len(y) - COPIES, len(y))
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    torch.manual_seed(0)
    if request.param == "linear":
        factory, weight_decay = kit.linear_factory(), 1e-2
        model = kit.fit_lbfgs(factory(), tx, ty, weight_decay)
        checkpoints = [kit.snapshot(model, index=0, step=1, lr=1.0)]
    else:
        factory, weight_decay, lr = kit.mlp_factory(), 1e-3, 0.1
        model = factory()
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(0)
        checkpoints, step = [], 0
        for epoch in range(40):
            for batch in torch.randperm(len(y), generator=gen).split(32):
                opt.zero_grad()
                F.cross_entropy(model(tx[batch]), ty[batch]).backward()
                opt.step()
                step += 1
            if epoch % 10 == 9:
                checkpoints.append(kit.snapshot(model, index=len(checkpoints), step=step, lr=lr))
    ctx = kit.make_context(
        factory, checkpoints, x, y, digits["test_x"], digits["test_y"], weight_decay
    )
    return ctx, ctx.train_ids[bad]


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
