"""Iterative influence solvers (CG, LiSSA, Arnoldi) against the exact solve and leave-one-out.

The convex case is the one of ``test_estimators_loo.py``: L2-regularized multinomial logistic
regression on digits 3/5/8 (n=300, 15 PCA features, d=48, lam=1e-2), with the leave-one-out
truth ``Delta_i = U(theta_without_i) - U(theta)`` from numpy + scipy L-BFGS (independent of
torch). Every estimator runs at its default damping, the same for all (0.1 x the mean eigenvalue
of the curvature, ``estimators.damping``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from estimators import iterative_influence
from estimators.base import Attribution
from estimators.damping import RELATIVE
from estimators.hvp import dense_eigenpairs, ritz_pairs
from estimators.influence import ExactInfluence
from estimators.iterative_influence import (
    ArnoldiInfluence,
    ConjugateGradientInfluence,
    LissaInfluence,
    arnoldi_eigenpairs,
    block_conjugate_gradient,
    conjugate_gradient,
)

LAM = 1e-2
N_REMOVED = 60
ESTIMATORS = {
    "if_cg": ConjugateGradientInfluence,
    "if_lissa": LissaInfluence,
    "if_arnoldi": ArnoldiInfluence,
}


@pytest.fixture(scope="module")
def convex(loo_case):
    """The fitted model, its scoring context, a 20-target context and the LOO truth."""
    return {**loo_case(N_REMOVED, lam=LAM), "cache": {}}


def _attribution(convex, name: str, **options) -> Attribution:
    """Score once per (estimator, options) for the whole module."""
    key = (name, tuple(sorted(options.items())))
    if key not in convex["cache"]:
        estimator = ExactInfluence(**options) if name == "if_exact" else ESTIMATORS[name](**options)
        convex["cache"][key] = estimator.score(convex["ctx"])
    return convex["cache"][key]


def _pearson_with_exact(convex, name: str, capsys, **options) -> float:
    exact = _attribution(convex, "if_exact")
    approx = _attribution(convex, name, **options)
    assert np.array_equal(approx.sample_ids, exact.sample_ids)
    pearson = pearsonr(approx.score, exact.score)[0]
    with capsys.disabled():
        print(f"\n[{name} {options} vs if_exact] Pearson={pearson:.6f} (1-r={1 - pearson:.1e})")
    return pearson


def test_cg_matches_exact(convex, capsys) -> None:
    """At its default rtol (1e-4) the ranking is the exact one; tightened, so are the values."""
    assert _pearson_with_exact(convex, "if_cg", capsys) >= 0.9999
    exact, cg = _attribution(convex, "if_exact"), _attribution(convex, "if_cg")
    assert spearmanr(cg.score, exact.score)[0] >= 0.9999
    assert np.allclose(cg.score, exact.score, rtol=0, atol=1e-3 * np.abs(exact.score).max())
    tight = _attribution(convex, "if_cg", rtol=1e-8)
    assert np.allclose(tight.score, exact.score, rtol=0, atol=1e-6 * np.abs(exact.score).max())
    assert cg.suspicion is None


def test_lissa_matches_exact(convex, capsys) -> None:
    assert _pearson_with_exact(convex, "if_lissa", capsys) >= 0.95


def test_full_rank_arnoldi_equals_exact(convex, capsys) -> None:
    """With float64 products full rank is the exact solve; with float32 (the default) it is
    within the products' rounding."""
    options = {"n_iter": 48, "rank": 48, "products": "float64"}
    _pearson_with_exact(convex, "if_arnoldi", capsys, **options)
    exact, arnoldi = _attribution(convex, "if_exact"), _attribution(convex, "if_arnoldi", **options)
    assert np.allclose(arnoldi.score, exact.score, rtol=1e-6, atol=1e-9)
    assert np.allclose(arnoldi.suspicion, exact.suspicion, rtol=1e-6, atol=1e-9)
    single = _attribution(convex, "if_arnoldi", n_iter=48, rank=48)
    scale = np.abs(exact.score).max()
    assert np.allclose(single.score, exact.score, rtol=0, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="products"):
        ArnoldiInfluence(products="half")


def test_low_rank_arnoldi_is_a_subspace_approximation(convex) -> None:
    exact = _attribution(convex, "if_exact")
    low = _attribution(convex, "if_arnoldi", n_iter=30, rank=20, complement=False)
    assert pearsonr(low.score, exact.score)[0] > 0.5
    assert np.all(low.suspicion <= exact.suspicion * (1 + 1e-9))


def test_low_rank_arnoldi_with_its_complement_is_closer_to_exact(convex) -> None:
    """The complement term (weight 1/(wd + damping)) makes the low-rank solve the inverse of a
    damped low-rank curvature: closer to the exact scores than dropping those directions."""
    exact = _attribution(convex, "if_exact").score
    subspace = _attribution(convex, "if_arnoldi", n_iter=30, rank=20, complement=False).score
    full = _attribution(convex, "if_arnoldi", n_iter=30, rank=20).score
    assert pearsonr(full, exact)[0] > pearsonr(subspace, exact)[0]


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_positive_spearman_with_leave_one_out(convex, name: str, capsys) -> None:
    attribution = _attribution(convex, name)
    position = {sid: k for k, sid in enumerate(attribution.sample_ids)}
    ids = convex["ctx"].train_ids[convex["removed"]]
    score = attribution.score[[position[sid] for sid in ids]]
    rho = spearmanr(score, convex["delta"])[0]
    with capsys.disabled():
        print(f"\n[{name} vs LOO] Spearman={rho:.4f} over {N_REMOVED} removals")
    assert rho > 0.5, f"{name}: Spearman {rho:.3f} with the LOO truth"


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_pairwise_columns_sum_to_the_summed_target_score(convex, name: str) -> None:
    """Linear in the target up to the solve's tolerance (if_cg's tightened to show it)."""
    few = convex["few"]
    estimator = ESTIMATORS[name](**({"rtol": 1e-8} if name == "if_cg" else {}))
    train_ids, target_ids, matrix = estimator.pairwise(few)
    summed = estimator.score(few)
    assert matrix.shape == (len(few.train_ids), 20) and matrix.dtype == np.float64
    assert len(target_ids) == 20
    assert np.array_equal(train_ids, summed.sample_ids)
    scale = np.abs(summed.score).max()
    assert np.allclose(matrix.sum(axis=1), summed.score, rtol=0, atol=1e-5 * scale)


def test_lissa_products_in_float32_give_float64_products_scores(convex) -> None:
    """float32 minibatch products (the default) round far below LiSSA's minibatch noise."""
    few = convex["few"]
    single = LissaInfluence(depth=200).score(few).score
    double = LissaInfluence(depth=200, products="float64").score(few).score
    assert single.dtype == np.float64 and not np.array_equal(single, double)
    assert np.allclose(single, double, rtol=0, atol=1e-5 * np.abs(double).max())
    with pytest.raises(ValueError, match="products"):
        LissaInfluence(products="float16")


def test_lissa_is_seeded(convex) -> None:
    again = LissaInfluence(depth=50).score(convex["few"])
    assert np.array_equal(again.score, LissaInfluence(depth=50).score(convex["few"]).score)
    other = LissaInfluence(depth=50).score(dataclasses.replace(convex["few"], seed=1))
    assert not np.array_equal(again.score, other.score)


def test_lissa_divergence_raises(convex) -> None:
    with pytest.raises(ValueError, match="LiSSA diverged"):
        LissaInfluence(scale=0.05, depth=200).score(convex["few"])


def test_mlp_ggn_solvers_match_exact(lbfgs_mlp) -> None:
    """Non-convex model (d=307): CG and full-rank Arnoldi on the damped GGN equal Cholesky."""
    ctx = lbfgs_mlp
    exact = ExactInfluence().score(ctx).score
    cg = ConjugateGradientInfluence(maxiter=500).score(ctx).score
    arnoldi = ArnoldiInfluence(n_iter=307, rank=307, products="float64").score(ctx).score
    scale = np.abs(exact).max()
    assert np.allclose(cg, exact, rtol=0, atol=1e-4 * scale)
    assert np.allclose(arnoldi, exact, rtol=1e-6, atol=1e-8 * scale)


def test_cg_solves_many_targets_in_groups_that_fit_the_block_memory(lbfgs_mlp, monkeypatch):
    """Targets beyond one block's memory are solved group by group: the same scores."""
    import estimators.iterative_influence as iterative

    whole = ConjugateGradientInfluence(rtol=1e-8).pairwise(lbfgs_mlp)[2]
    assert iterative.block_width(307, 200) >= whole.shape[1]
    # d = 307 <= maxiter * m for m >= 2: a budget below d x d fits one column per group
    monkeypatch.setattr(iterative, "BLOCK_MEMORY_BYTES", 16 * 307 * 250)
    assert iterative.block_width(307, 200) == 1
    grouped = ConjugateGradientInfluence(rtol=1e-8).pairwise(lbfgs_mlp)[2]
    assert np.allclose(grouped, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    monkeypatch.setattr(iterative, "BLOCK_MEMORY_BYTES", 16 * 307 * 199)
    assert iterative.block_width(307, 200) == 0  # not one column fits: column-wise CG


def test_conjugate_gradient_rejects_indefinite_systems() -> None:
    matrix = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    rhs = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-positive curvature"):
        conjugate_gradient(lambda v: matrix @ v, rhs)
    spd = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    solution, iterations, residual = conjugate_gradient(lambda v: spd @ v, rhs)
    assert torch.allclose(solution, torch.linalg.solve(spd, rhs)) and iterations <= 3
    assert residual <= 1e-6


def test_arnoldi_restarts_on_repeated_eigenvalues() -> None:
    """A Krylov space from one vector sees one direction per distinct eigenvalue; the restart
    after breakdown must still recover the whole spectrum when n_iter = d."""
    gen = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=gen))
    spectrum = torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    matrix = rotation @ torch.diag(spectrum) @ rotation.T
    values, vectors = arnoldi_eigenpairs(lambda v: matrix @ v, 8, 8, seed=3)
    assert torch.allclose(values, spectrum, atol=1e-10)
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, matrix, atol=1e-10)
    assert torch.allclose(vectors.T @ vectors, torch.eye(8, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("block", [3, 8])
def test_block_arnoldi_recovers_the_spectrum_through_breakdowns(block: int) -> None:
    """Blocks of products, repeated eigenvalues and a null space: n_iter = d is still exact."""
    gen = torch.Generator().manual_seed(2)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=gen))
    spectrum = torch.tensor([4.0, 4.0, 2.0, 2.0, 2.0, 1.0, 0.5, 0.1, 0, 0, 0, 0],
                            dtype=torch.float64)
    matrix = rotation @ torch.diag(spectrum) @ rotation.T
    values, vectors = arnoldi_eigenpairs(lambda v: matrix @ v, 12, 12, seed=3, block=block)
    assert torch.allclose(values, spectrum, atol=1e-10)
    assert torch.allclose(vectors.T @ vectors, torch.eye(12, dtype=torch.float64), atol=1e-10)


def test_dense_eigenpairs_match_arnoldi_over_the_whole_space() -> None:
    """d products on the identity, diagonalized: the spectrum (descending) and an orthonormal
    basis that rebuilds the matrix, null space included."""
    gen = torch.Generator().manual_seed(5)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=gen))
    spectrum = torch.tensor([4.0, 4.0, 2.0, 1.5, 1.0, 0.5, 0.1, 0.01, 0, 0, 0, 0],
                            dtype=torch.float64)
    matrix = rotation @ torch.diag(spectrum) @ rotation.T
    columns: list[int] = []

    def product(v: torch.Tensor) -> torch.Tensor:
        columns.append(v.shape[1])
        return matrix @ v

    values, vectors = dense_eigenpairs(product, 12)
    assert columns == [12]
    assert torch.allclose(values, spectrum, atol=1e-12)
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, matrix, atol=1e-12)
    assert torch.allclose(vectors.T @ vectors, torch.eye(12, dtype=torch.float64), atol=1e-12)
    krylov, _ = arnoldi_eigenpairs(lambda v: matrix @ v, 12, 12, seed=1, block=4)
    assert torch.allclose(values, krylov, atol=1e-10)


def test_arnoldi_stops_when_asked() -> None:
    """``stop`` sees the basis and Q^T A Q every ``check_every`` products; True ends the
    iteration."""
    matrix = torch.diag(torch.logspace(0, -4, 40, dtype=torch.float64))
    seen: list[int] = []

    def stop(basis: torch.Tensor, projected: torch.Tensor) -> bool:
        k = basis.shape[1]
        seen.append(k)
        assert torch.allclose(projected, basis.T @ matrix @ basis, atol=1e-12)
        return k >= 20

    values, vectors = arnoldi_eigenpairs(lambda v: matrix @ v, 40, 40, block=4, stop=stop,
                                         check_every=8)
    assert seen == [8, 16, 24] and values.shape == (24,) and vectors.shape == (40, 24)


def test_arnoldi_inverse_from_the_basis_equals_the_one_from_ritz_pairs() -> None:
    """With Q^T C Q positive definite, Q (T + s)^-1 Q^T + P / (mu + s) (what the adaptive
    stop checks) is the Ritz-pair form U (Lambda + s)^-1 U^T + P / (mu + s)."""
    gen = torch.Generator().manual_seed(4)
    basis, _ = torch.linalg.qr(torch.randn(50, 12, dtype=torch.float64, generator=gen))
    root = torch.randn(12, 12, dtype=torch.float64, generator=gen)
    projected = root @ root.T + 0.1 * torch.eye(12, dtype=torch.float64)
    rhs = torch.randn(50, 3, dtype=torch.float64, generator=gen)
    for complement in (True, False):
        estimator = ArnoldiInfluence(complement=complement)
        values, vectors = ritz_pairs(basis, projected)
        ritz = estimator._apply(values, vectors, 0.7, 0.05, rhs)
        krylov = estimator._apply_krylov(basis, projected, 0.7, 0.05, rhs)
        assert torch.allclose(krylov, ritz, atol=1e-10)


def test_default_arnoldi_on_a_small_model_is_the_exact_solve(lbfgs_mlp) -> None:
    """d=307 <= WHOLE_SPACE: the default diagonalizes C built from d products, whatever
    rtol, so the scores are the exact damped solve (up to float32 products)."""
    exact = ExactInfluence().score(lbfgs_mlp)
    for rtol in (1e-6, 0.5):
        estimator = ArnoldiInfluence(rtol=rtol)
        attribution = estimator.score(lbfgs_mlp)
        assert estimator.krylov_dimension == 307
        assert pearsonr(attribution.score, exact.score)[0] > 0.99999
        assert pearsonr(attribution.suspicion, exact.suspicion)[0] > 0.99999


def test_solve_and_its_residual_say_how_exact_a_solver_is(lbfgs_mlp, monkeypatch) -> None:
    """``relative_residual`` measures ``solve`` against the float64 damped operator: tight CG
    is exact, an 8-dimensional Arnoldi is not, and the adaptive Arnoldi reaches its rtol on
    the right-hand sides it stops on (``stop_probes``)."""
    monkeypatch.setattr(iterative_influence, "WHOLE_SPACE", 0)
    rhs = torch.randn(307, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    tight = ConjugateGradientInfluence(rtol=1e-10, maxiter=2000)
    assert tight.solve(lbfgs_mlp, rhs).shape == (307, 3)
    assert tight.relative_residual(lbfgs_mlp, rhs) < 1e-8
    assert ArnoldiInfluence(n_iter=8).relative_residual(lbfgs_mlp, rhs) > 1e-2
    adaptive = ArnoldiInfluence()
    probes = adaptive.stop_probes(lbfgs_mlp)
    assert probes.shape == (307, iterative_influence.STOP_PROBES)
    assert adaptive.relative_residual(lbfgs_mlp, probes) <= adaptive.rtol


def test_default_arnoldi_converges_to_the_exact_solve(lbfgs_mlp, capsys, monkeypatch) -> None:
    """No n_iter, Krylov path (WHOLE_SPACE below d): Arnoldi grows its Krylov space until the
    solve reaches rtol, so a tight rtol matches the exact damped solve and a loose one stops at
    a smaller dimension (d=307)."""
    monkeypatch.setattr(iterative_influence, "WHOLE_SPACE", 0)
    exact = ExactInfluence().score(lbfgs_mlp).score
    dimensions = {}
    for rtol in (1e-6, 0.5):
        estimator = ArnoldiInfluence(rtol=rtol)
        pearson = pearsonr(estimator.score(lbfgs_mlp).score, exact)[0]
        dimensions[rtol] = estimator.krylov_dimension
        with capsys.disabled():
            print(f"\n[if_arnoldi rtol={rtol}] Krylov dimension {estimator.krylov_dimension} "
                  f"of d=307, Pearson with exact {pearson:.8f}")
        if rtol == 1e-6:
            assert pearson > 0.9999
    assert dimensions[0.5] < dimensions[1e-6]


def test_block_conjugate_gradient_solves_every_column_in_fewer_products() -> None:
    gen = torch.Generator().manual_seed(1)
    rotation, _ = torch.linalg.qr(torch.randn(80, 80, dtype=torch.float64, generator=gen))
    spd = rotation @ torch.diag(torch.logspace(-3, 0, 80, dtype=torch.float64)) @ rotation.T
    rhs = torch.randn(80, 6, dtype=torch.float64, generator=gen)
    columns = {"block": 0, "plain": 0}

    def counted(kind: str):
        def apply(v: torch.Tensor) -> torch.Tensor:
            columns[kind] += v.shape[1]
            return spd @ v
        return apply

    block, steps, residual = block_conjugate_gradient(counted("block"), rhs, maxiter=500)
    plain, _, _ = conjugate_gradient(counted("plain"), rhs, maxiter=500)
    exact = torch.linalg.solve(spd, rhs)
    assert residual <= 1e-6 and torch.allclose(block, exact, rtol=1e-5, atol=1e-8)
    assert torch.allclose(plain, exact, rtol=1e-4, atol=1e-6)
    assert columns["block"] < columns["plain"] / 2 and steps <= 80 // 6 + 1
    indefinite = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-positive curvature"):
        block_conjugate_gradient(lambda v: indefinite @ v, torch.ones(3, 2, dtype=torch.float64))


def test_default_damping_is_relative_to_the_curvature_and_shared(convex) -> None:
    """0.1 x trace(C)/d (Hutchinson, within its error), the same value for every estimator."""
    from estimators.influence import curvature_matrix

    ctx = convex["ctx"]
    exact = ExactInfluence()
    exact.score(ctx)
    model = ctx.model_at(ctx.final)
    c = curvature_matrix(model, ctx.train_x, ctx.train_y)
    true = RELATIVE * float(torch.trace(c)) / c.shape[0]
    assert exact.damping_used == pytest.approx(true, rel=0.3)
    for cls in ESTIMATORS.values():
        other = cls()
        other.score(ctx)
        assert other.damping_used == pytest.approx(exact.damping_used, rel=1e-6)
    fixed = ConjugateGradientInfluence(damping=0.0)
    fixed.score(ctx)
    assert fixed.damping_used == 0.0

