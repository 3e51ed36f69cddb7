"""Per-sample gradients, the in-memory gradient source, and the curvature builder."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from estimators import InMemoryGradients, per_sample_gradients
from estimators.gradient_source import summed_loss_gradient
from estimators.influence import curvature_matrix


def _loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for xi, yi in zip(x, y, strict=True):
        loss = F.cross_entropy(model(xi.unsqueeze(0)), yi.unsqueeze(0))
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _random_data(n: int = 23, features: int = 5, classes: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def test_per_sample_gradients_match_autograd_loop(kit) -> None:
    torch.manual_seed(0)
    model = kit.mlp_factory(features=5, hidden=7, classes=4)().eval()
    model[0].bias.requires_grad_(False)  # frozen parameters are skipped
    x, y = _random_data()
    expected = _loop_gradients(model, x, y)
    got = per_sample_gradients(model, x, y, chunk_size=5)
    assert got.shape == (23, sum(p.numel() for p in model.parameters() if p.requires_grad))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_in_memory_gradients_compute_and_shards(kit) -> None:
    torch.manual_seed(1)
    factory = kit.mlp_factory(features=5, hidden=7, classes=4)
    x, y = _random_data(n=23)
    tx, ty = _random_data(n=9, seed=1)
    models = [factory(), factory()]
    ckpts = [kit.snapshot(m, index=i, step=10 * i, lr=0.1) for i, m in enumerate(models)]
    ids = np.arange(23) * 3
    source = InMemoryGradients.compute(factory, ckpts, ids, x, y, tx, ty, shard_size=5)

    assert source.checkpoints == [0, 1]
    for i, model in enumerate(models):
        shards = list(source.train_shards(i))
        assert [len(s) for s, _ in shards] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.concatenate([s for s, _ in shards]), ids)
        grads = torch.cat([g for _, g in shards])
        torch.testing.assert_close(grads, _loop_gradients(model.eval(), x, y))
        target = source.target(i)
        assert target.dtype == torch.float64 and target.shape == (grads.shape[1],)
        torch.testing.assert_close(target, _loop_gradients(model, tx, ty).sum(0))
        torch.testing.assert_close(summed_loss_gradient(model, tx, ty, chunk_size=4), target)


def test_ggn_equals_hessian_for_multinomial_logistic_regression(kit) -> None:
    torch.manual_seed(2)
    model = kit.linear_factory(features=6, classes=3)().eval()
    x, y = _random_data(n=50, features=6, classes=3)
    ggn = curvature_matrix(model, x, y, kind="ggn", chunk_size=16)
    hess = curvature_matrix(model, x, y, kind="hessian", chunk_size=16)
    assert ggn.shape == (21, 21) and ggn.dtype == torch.float64
    torch.testing.assert_close(ggn, hess, rtol=0, atol=1e-8)

    # and both equal the Hessian of the mean loss computed independently
    w, b = model.weight.detach(), model.bias.detach()

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        logits = x @ flat[:18].view(3, 6).T + flat[18:]
        return F.cross_entropy(logits, y)

    reference = torch.autograd.functional.hessian(mean_loss, torch.cat([w.reshape(-1), b]))
    torch.testing.assert_close(hess, reference, rtol=0, atol=1e-10)


def test_ggn_is_psd_and_close_to_hessian_for_an_mlp(kit) -> None:
    torch.manual_seed(3)
    model = kit.mlp_factory(features=5, hidden=6, classes=3)().eval()
    x, y = _random_data(n=40, features=5, classes=3)
    ggn = curvature_matrix(model, x, y, kind="ggn", chunk_size=7)
    hess = curvature_matrix(model, x, y, kind="hessian", chunk_size=7)
    torch.testing.assert_close(ggn, ggn.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(hess, hess.T, rtol=0, atol=1e-10)
    assert torch.linalg.eigvalsh(ggn)[0] > -1e-10
    # the GGN is the Hessian minus the residual term, so they differ but share the diagonal scale
    assert not torch.allclose(ggn, hess, atol=1e-6)
    ratio = torch.diagonal(ggn).sum() / torch.diagonal(hess).sum()
    assert 0.2 < float(ratio) < 5


def test_float32_model_gets_float64_curvature(kit) -> None:
    torch.manual_seed(4)
    model = nn.Linear(4, 3).eval()
    x, y = _random_data(n=30, features=4, classes=3)
    ggn = curvature_matrix(model, x.float(), y)
    model64 = nn.Linear(4, 3).to(torch.float64).eval()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    assert ggn.dtype == torch.float64
    torch.testing.assert_close(ggn, curvature_matrix(model64, x.float().double(), y))
