"""Estimator identities, baselines, the registry and error paths on a small random problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from estimators import ESTIMATORS, Checkpoint, Estimator, InMemoryGradients, Needs, make_estimator
from estimators.baselines import RandomScores, SelfLoss
from estimators.influence import ExactInfluence, curvature_matrix, damped_cholesky
from estimators.inner_product import CosineInnerProduct, InnerProduct
from estimators.tracin import TracIn


@pytest.fixture(scope="module")
def small(kit):
    """A 6-5-3 MLP at three checkpoints (lr 0.3, 0.2, 0.1) on random data, n=37, 11 targets."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (37,), generator=gen)
    tx = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    ty = torch.randint(0, 3, (11,), generator=gen)
    factory = kit.mlp_factory(features=6, hidden=5, classes=3)
    torch.manual_seed(0)
    ckpts = [
        kit.snapshot(factory(), index=i, step=10 * i, lr=lr) for i, lr in enumerate([0.3, 0.2, 0.1])
    ]
    ctx = kit.make_context(factory, ckpts, x, y, tx, ty, weight_decay=1e-3, shard_size=8)
    return ctx


def _dense(ctx, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    source = ctx.gradients
    return source.train_matrix(index).to(torch.float64), source.target(index)


def test_registry_names_order_and_needs() -> None:
    assert list(ESTIMATORS)[:4] == ["random", "loss", "ip", "cosine"]
    assert {"tracin", "if_exact"} <= set(ESTIMATORS)
    expected = {
        "random": Needs("final", gradients=False, model=False),
        "loss": Needs("final", gradients=False, model=True),
        "ip": Needs("final", gradients=True, model=False),
        "cosine": Needs("final", gradients=True, model=False),
        "tracin": Needs("all", gradients=True, model=False),
        "if_exact": Needs("final", gradients=True, model=True, full_gradients=True),
    }
    for name, cls in ESTIMATORS.items():
        assert issubclass(cls, Estimator) and cls.name == name
        assert cls.needs == expected.get(name, cls.needs)
        assert isinstance(make_estimator(name), cls)


def test_registry_errors() -> None:
    with pytest.raises(KeyError, match="if_exact"):
        make_estimator("nope")
    with pytest.raises(TypeError, match="dampin"):
        make_estimator("if_exact", dampin=0.1)
    with pytest.raises(TypeError, match="seed"):
        make_estimator("ip", seed=1)
    est = make_estimator("if_exact", curvature="hessian", damping=0.1, max_params=10)
    assert (est.curvature, est.damping, est.max_params) == ("hessian", 0.1, 10)
    with pytest.raises(ValueError, match="curvature"):
        make_estimator("if_exact", curvature="kfac")


def test_random_is_deterministic_in_the_seed(small) -> None:
    a = RandomScores(seed=5).score(small)
    b = make_estimator("random", seed=5).score(small)
    np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(a.sample_ids, small.train_ids)
    assert a.suspicion is None
    assert not np.array_equal(a.score, RandomScores(seed=6).score(small).score)
    np.testing.assert_array_equal(
        RandomScores().score(small).score, np.random.default_rng(small.seed).standard_normal(37)
    )


def test_self_loss(small) -> None:
    attribution = SelfLoss(batch_size=10).score(small)
    model = small.model_at(small.final)
    with torch.no_grad():
        loss = F.cross_entropy(model(small.train_x), small.train_y, reduction="none").numpy()
    np.testing.assert_allclose(attribution.suspicion, loss, rtol=1e-12)
    np.testing.assert_allclose(attribution.score, -loss, rtol=1e-12)


def test_ip_equals_tracin_with_one_checkpoint_of_lr_one(small) -> None:
    final = small.final
    single = Checkpoint(index=final.index, step=final.step, lr=1.0, load=final.load)
    ctx = type(small)(**{**vars(small), "checkpoints": [single]})
    ip, tracin = InnerProduct().score(ctx), TracIn().score(ctx)
    np.testing.assert_array_equal(ip.sample_ids, tracin.sample_ids)
    np.testing.assert_allclose(ip.score, tracin.score, rtol=1e-12)
    np.testing.assert_allclose(ip.suspicion, tracin.suspicion, rtol=1e-12)


def test_ip_cosine_tracin_match_dense_formulas(small) -> None:
    g, g_v = _dense(small, small.final.index)
    ip = InnerProduct().score(small)
    assert ip.score.dtype == np.float64 and ip.sample_ids.dtype == np.int64
    np.testing.assert_array_equal(ip.sample_ids, small.train_ids)
    np.testing.assert_allclose(ip.score, (g @ g_v).numpy(), rtol=1e-12)
    np.testing.assert_allclose(ip.suspicion, (g * g).sum(1).numpy(), rtol=1e-12)

    cosine = CosineInnerProduct().score(small)
    expected = (g @ g_v) / (g.norm(dim=1) * g_v.norm() + 1e-12)
    np.testing.assert_allclose(cosine.score, expected.numpy(), rtol=1e-12)
    assert cosine.suspicion is None and np.abs(cosine.score).max() <= 1

    score, suspicion = 0.0, 0.0
    for ckpt in small.checkpoints:
        g, g_v = _dense(small, ckpt.index)
        score = score + ckpt.lr * (g @ g_v).numpy()
        suspicion = suspicion + ckpt.lr * (g * g).sum(1).numpy()
    tracin = TracIn().score(small)
    np.testing.assert_allclose(tracin.score, score, rtol=1e-12)
    np.testing.assert_allclose(tracin.suspicion, suspicion, rtol=1e-12)


def test_tracin_aligns_checkpoints_that_shard_in_different_orders(small) -> None:
    source = small.gradients
    perm = np.random.default_rng(0).permutation(len(small.train_ids))
    grads = {c.index: source.train_matrix(c.index) for c in small.checkpoints}
    targets = {c.index: source.target(c.index) for c in small.checkpoints}

    class Shuffled:
        """Checkpoint 1 yields its rows in a different order."""

        def train_shards(self, checkpoint: int):
            order = perm if checkpoint == 1 else np.arange(len(perm))
            yield small.train_ids[order], grads[checkpoint][order]

        def target(self, checkpoint: int) -> torch.Tensor:
            return targets[checkpoint]

    ctx = type(small)(**{**vars(small), "gradients": Shuffled()})
    np.testing.assert_allclose(TracIn().score(ctx).score, TracIn().score(small).score, rtol=1e-12)


def test_exact_influence_matches_dense_solve(small) -> None:
    damping = 0.05
    attribution = ExactInfluence(curvature="ggn", damping=damping).score(small)
    model = small.model_at(small.final)
    h = curvature_matrix(model, small.train_x, small.train_y, kind="ggn")
    h_total = h + (small.weight_decay + damping) * torch.eye(h.shape[0], dtype=torch.float64)
    g, g_v = _dense(small, small.final.index)
    inverse = torch.linalg.inv(h_total)
    np.testing.assert_allclose(attribution.score, (g @ inverse @ g_v).numpy(), rtol=1e-8)
    expected_self = torch.einsum("nd,de,ne->n", g, inverse, g).numpy()
    np.testing.assert_allclose(attribution.suspicion, expected_self, rtol=1e-8)
    assert (attribution.suspicion > 0).all()


def test_estimators_compute_gradients_when_the_context_has_none(small) -> None:
    ctx = type(small)(**{**vars(small), "gradients": None})
    for name in ["ip", "tracin", "if_exact"]:
        np.testing.assert_allclose(
            make_estimator(name).score(ctx).score, make_estimator(name).score(small).score
        )


def test_exact_influence_refuses_large_models(small) -> None:
    with pytest.raises(ValueError, match="max_params=10"):
        ExactInfluence(max_params=10).score(small)


def test_damped_cholesky_rejects_indefinite_matrices() -> None:
    h = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="not positive definite"):
        damped_cholesky(h, 0.1)
    factor = damped_cholesky(h, 1.0)
    torch.testing.assert_close(factor @ factor.T, h + torch.eye(3, dtype=torch.float64))


def test_in_memory_gradients_validate_shapes() -> None:
    with pytest.raises(ValueError, match="train gradients"):
        InMemoryGradients(np.arange(3), [torch.zeros(4, 2)], [torch.zeros(2)])
    with pytest.raises(ValueError, match="target gradient"):
        InMemoryGradients(np.arange(3), [torch.zeros(3, 2)], [torch.zeros(5)])
    source = InMemoryGradients(np.arange(3), {7: torch.ones(3, 2)}, {7: torch.ones(2)})
    with pytest.raises(KeyError, match="checkpoint 0"):
        list(source.train_shards(0))
