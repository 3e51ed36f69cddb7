"""Random projection (spec sections 10 and 11.3): accuracy on real per-sample gradients,
bit-identical results under any sharding of the samples, seeding, and bounded tiles."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from estimators.per_sample import parameter_order, per_sample_gradients
from estimators.projection import Projector

KINDS = ("rademacher", "gaussian")


@pytest.fixture(scope="module")
def mlp_gradients(digits, kit):
    """Per-sample cross-entropy gradients (120, d=1219) of a 15-64-3 tanh MLP after 20 epochs
    of SGD on digits 3/5/8, and the model."""
    torch.manual_seed(0)
    model = kit.mlp_factory(hidden=64)()
    x, y = torch.from_numpy(digits["train_x"]), torch.from_numpy(digits["train_y"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        for batch in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    model.eval()
    return model, per_sample_gradients(model, x[:120], y[:120])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [256, 1024])
def test_inner_products_within_four_over_sqrt_k(mlp_gradients, kind, k, capsys) -> None:
    model, grads = mlp_gradients
    projector = Projector.for_model(model, k, seed=0, kind=kind)
    x = projector.project(grads).to(torch.float64)
    exact, approx = grads @ grads.T, x @ x.T
    norms = torch.linalg.vector_norm(grads, dim=1)
    upper = torch.triu_indices(len(grads), len(grads), offset=1)
    error = (approx - exact)[upper[0], upper[1]].abs() / (norms[upper[0]] * norms[upper[1]])
    fraction = (error < 4 / k**0.5).double().mean().item()
    with capsys.disabled():
        print(
            f"\n[projection {kind} k={k}] d={grads.shape[1]}, {error.numel()} pairs: "
            f"fraction within 4/sqrt(k) = {fraction:.4f}, median relative error = "
            f"{error.median().item():.4f} (1/sqrt(k) = {k**-0.5:.4f})"
        )
    assert fraction >= 0.99
    # squared norms are also preserved in expectation
    ratio = (x * x).sum(1) / norms**2
    assert abs(ratio.mean().item() - 1) < 0.05


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bit_identical_across_sample_shards(mlp_gradients, kind, dtype) -> None:
    model, grads = mlp_gradients
    grads = grads.to(dtype)
    projector = Projector.for_model(model, 128, seed=3, kind=kind, max_rows=100, block_rows=16)
    whole = projector.project(grads)
    shards = [(0, 1), (1, 30), (30, 77), (77, 120)]  # 4 uneven shards, none a block multiple
    parts = torch.cat([projector.project(grads[a:b], first_row=a) for a, b in shards])
    assert whole.dtype == torch.float32 and whole.shape == (120, 128)
    assert torch.equal(whole, parts)
    # a fresh projector (another worker) regenerates the same tiles
    again = Projector.for_model(model, 128, seed=3, kind=kind, max_rows=100, block_rows=16)
    assert torch.equal(again.project(grads[30:77], first_row=30), whole[30:77])
    # one row at a time
    singles = [projector.project(g[None], first_row=i) for i, g in enumerate(grads[:5])]
    assert torch.equal(torch.cat(singles), whole[:5])


@pytest.mark.parametrize("kind", KINDS)
def test_seeding(mlp_gradients, kind) -> None:
    model, grads = mlp_gradients
    base = Projector.for_model(model, 64, seed=7, kind=kind).project(grads)
    assert torch.equal(Projector.for_model(model, 64, seed=7, kind=kind).project(grads), base)
    for other in (
        Projector.for_model(model, 64, seed=8, kind=kind),
        Projector.for_model(model, 64, seed=7, kind=kind, model_id=1),
    ):
        assert not torch.allclose(other.project(grads), base, rtol=0.1, atol=0)
    rademacher = Projector.for_model(model, 64, seed=7).project(grads)
    gaussian = Projector.for_model(model, 64, seed=7, kind="gaussian").project(grads)
    assert not torch.allclose(rademacher, gaussian, rtol=0.1, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_tiles_are_bounded_and_do_not_change_p(mlp_gradients, kind) -> None:
    """Tiny tiles (max_rows=7 rows of P at a time) give the same P and the same projections as
    one tile per parameter, up to float summation order; no tile exceeds max_rows x k."""
    model, grads = mlp_gradients
    small = Projector.for_model(model, 96, seed=1, kind=kind, max_rows=7, cache_bytes=0)
    large = Projector.for_model(model, 96, seed=1, kind=kind, max_rows=2**16, cache_bytes=0)
    shapes = [tuple(tile.shape) for _, tile in small._tiles(torch.device("cpu"))]
    assert max(rows for rows, _ in shapes) <= 7 and {cols for _, cols in shapes} == {96}
    assert sum(rows for rows, _ in shapes) == small.dim
    assert torch.equal(small.matrix(), large.matrix())
    torch.testing.assert_close(small.project(grads), large.project(grads), rtol=1e-5, atol=1e-5)
    # entry (r, j) of P is a function of (seed, parameter, r, j) only, whatever the tiling
    big = Projector(8, seed=1, kind=kind, parameter_sizes=[("w", 70_005)], max_rows=1000)
    whole = Projector(8, seed=1, kind=kind, parameter_sizes=[("w", 70_005)], max_rows=2**17)
    assert big.matrix().shape == (70_005, 8) and torch.equal(big.matrix(), whole.matrix())


@pytest.mark.parametrize("kind", KINDS)
def test_precisions_agree_within_their_rounding(mlp_gradients, kind) -> None:
    """float32 (the default) and bfloat16 operands agree with the float64 product within the
    contract's tolerances (relative to the largest output entry)."""
    model, grads = mlp_gradients
    exact = Projector.for_model(model, 64, seed=2, kind=kind, precision="float64").project(
        grads, dtype=torch.float64)
    scale = exact.abs().max()
    for precision, tolerance in (("float32", 1e-5), ("bfloat16", 3e-2)):
        approx = Projector.for_model(model, 64, seed=2, kind=kind, precision=precision).project(
            grads, dtype=torch.float64)
        assert (approx - exact).abs().max() / scale < tolerance, precision


def test_distribution_of_entries() -> None:
    sizes = [("a", 3000), ("b", 17)]
    rademacher = Projector(64, 0, parameter_sizes=sizes).matrix()
    assert set(rademacher.unique().tolist()) == {-1.0, 1.0}
    assert abs(rademacher.mean().item()) < 0.01
    gaussian = Projector(64, 0, "gaussian", parameter_sizes=sizes).matrix()
    assert abs(gaussian.mean().item()) < 0.01 and abs(gaussian.var().item() - 1) < 0.02
    assert abs((gaussian**4).mean().item() - 3) < 0.1  # Gaussian kurtosis
    assert torch.equal(gaussian, gaussian.to(torch.float32).to(torch.float64))  # float32 entries
    # the projection is P^T g / sqrt(k)
    g = torch.randn(5, 3017, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    projector = Projector(64, 0, "gaussian", parameter_sizes=sizes, precision="float64")
    torch.testing.assert_close(
        projector.project(g, dtype=torch.float64), g @ gaussian / 8, rtol=1e-12, atol=1e-12
    )


def test_unbiased_inner_products() -> None:
    """E[x_1 . x_2] = g_1 . g_2: averaged over 200 seeds the error shrinks like 1/sqrt(200 k)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(2, 50, dtype=torch.float64, generator=gen)
    g[1] += g[0]
    sizes = [("w", 50)]
    estimates = []
    for seed in range(200):
        x = Projector(16, seed, parameter_sizes=sizes, precision="float64").project(
            g, dtype=torch.float64)
        estimates.append((x[0] @ x[1]).item())
    scale = (g[0].norm() * g[1].norm()).item()
    assert abs(np.mean(estimates) - (g[0] @ g[1]).item()) < 4 * scale / np.sqrt(200 * 16)


def test_metadata_cache_pickle_and_validation(mlp_gradients) -> None:
    model, grads = mlp_gradients
    projector = Projector.for_model(model, 32, seed=5, kind="gaussian", model_id=2)
    meta = projector.metadata()
    assert meta["parameter_order"] == parameter_order(model)
    assert [n for _, n in meta["parameter_sizes"]] == [p.numel() for p in model.parameters()]
    assert (meta["kind"], meta["k"], meta["seed"], meta["model_id"]) == ("gaussian", 32, 5, 2)
    assert meta["precision"] == "float32" and "counter_hash" in meta["seeding"]
    first = projector.project(grads)
    assert torch.equal(projector.project(grads), first)  # from the cache
    uncached = Projector.for_model(model, 32, seed=5, kind="gaussian", model_id=2, cache_bytes=0)
    assert torch.equal(uncached.project(grads), first)
    assert torch.equal(pickle.loads(pickle.dumps(projector)).project(grads), first)
    twin = Projector(32, 5, "gaussian", parameter_sizes=meta["parameter_sizes"], model_id=2)
    assert twin == projector and twin != uncached  # equality ignores the cache contents
    assert projector.project(grads[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match="shape"):
        projector.project(grads[:, :-1])
    with pytest.raises(ValueError, match="kind"):
        Projector(8, 0, "uniform", parameter_sizes=[("w", 3)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SeedSequence"):
        Projector(8, -1, parameter_sizes=[("w", 3)])
