"""EK-FAC / K-FAC influence (spec section 4): exactness of the Kronecker algebra, agreement with
exact GGN influence, the sign tests of section 11, pairwise consistency, excluded parameters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from sklearn.datasets import load_digits
from torch import nn

from estimators import ScoringContext, per_sample_gradients
from estimators.influence import ExactInfluence
from estimators.inner_product import InnerProduct
from estimators.kfac import EKFACInfluence, kronecker_blocks

LAM = 1e-2
DAMPING = 1e-2
COPIES = 3
KINDS = ["ekfac", "kfac"]


@pytest.fixture(scope="module")
def logistic(loo_case):
    """L2 logistic regression at its optimum, with LOO truth for 60 removed samples."""
    return loo_case(60, solver="torch", lam=LAM)


@pytest.fixture(scope="module")
def scaled(digits, kit):
    """Logistic regression on rescaled features, so that E[a a^T] has distinct eigenvalues (the
    standardized PCA features give A = I, whose eigenbasis, and so EK-FAC, is arbitrary)."""
    x = digits["train_x"] * np.linspace(0.5, 2.0, 15)
    tx = digits["test_x"] * np.linspace(0.5, 2.0, 15)
    model = kit.fit_lbfgs(kit.linear_factory()(), torch.as_tensor(x),
                          torch.as_tensor(digits["train_y"]), LAM)
    return {"ctx": kit.make_context(kit.linear_factory(), [kit.snapshot(model, 0, 1, 1.0)], x,
                                    digits["train_y"], tx, digits["test_y"], LAM)}


@pytest.fixture(scope="module")
def mlp(lbfgs_mlp):
    return lbfgs_mlp


def cnn_factory():
    """8x8 digit images as flat rows -> two convs (padding, stride) -> Linear; d = 299."""
    return lambda: nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).to(torch.float64)


@pytest.fixture(scope="module")
def cnn(kit):
    images, labels = load_digits(return_X_y=True)
    keep = np.isin(labels, (3, 5, 8))
    images, labels = images[keep] / 16.0, np.searchsorted((3, 5, 8), labels[keep])
    perm = np.random.default_rng(0).permutation(len(labels))
    train, test = perm[:200], perm[200:240]
    torch.manual_seed(0)
    x, y = torch.as_tensor(images[train]), torch.as_tensor(labels[train])
    model = cnn_factory()()
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-3)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return kit.make_context(cnn_factory(), [kit.snapshot(model.eval(), 0, 150, 0.02)],
                            images[train], labels[train], images[test], labels[test], 1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_exact_ggn_influence_on_logistic_regression(logistic, kind, capsys) -> None:
    ctx = logistic["ctx"]
    exact = ExactInfluence(curvature="ggn", damping=DAMPING).score(ctx)
    approx = EKFACInfluence(kind=kind, damping=DAMPING).score(ctx)
    np.testing.assert_array_equal(approx.sample_ids, exact.sample_ids)
    pearson = pearsonr(approx.score, exact.score)[0]
    suspicion = pearsonr(approx.suspicion, exact.suspicion)[0]
    with capsys.disabled():
        print(f"\n[{kind} vs if_exact(ggn), logistic regression] Pearson={pearson:.4f}, "
              f"Spearman={spearmanr(approx.score, exact.score)[0]:.4f}, "
              f"suspicion Pearson={suspicion:.4f}")
    assert pearson >= 0.9
    assert suspicion >= 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_equals_the_dense_kronecker_solve(scaled, kind) -> None:
    """One Linear layer, true labels: the scores equal ``g_V^T H^{-1} g_z`` with H built densely
    from closed-form softmax gradients (K-FAC: S kron A; EK-FAC: Q diag(Lambda) Q^T)."""
    ctx = scaled["ctx"]
    model = ctx.model_at(ctx.final)

    def grads(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        with torch.no_grad():
            s = torch.softmax(model(x), dim=1) - F.one_hot(y, 3).to(x.dtype)
        return a, s

    a, s = grads(ctx.train_x, ctx.train_y)
    n = len(a)
    e_a, q_a = torch.linalg.eigh(a.T @ a / n)
    e_s, q_s = torch.linalg.eigh(s.T @ s / n)
    g = torch.einsum("no,ni->noi", s, a).reshape(n, -1)  # vec(s a^T), row-major
    q = torch.kron(q_s, q_a)
    lam = torch.kron(e_s, e_a) if kind == "kfac" else ((g @ q) ** 2).mean(dim=0)
    h = q @ torch.diag(lam + DAMPING + LAM) @ q.T
    ta, ts = grads(ctx.target_x, ctx.target_y)
    g_v = torch.einsum("no,ni->oi", ts, ta).reshape(-1)
    expected = g @ torch.linalg.solve(h, g_v)
    self_inf = (g * torch.linalg.solve(h, g.T).T).sum(dim=1)

    got = EKFACInfluence(kind=kind, damping=DAMPING, sample_labels=False).score(ctx)
    np.testing.assert_allclose(got.score, expected.numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got.suspicion, self_inf.numpy(), rtol=1e-8)


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_positive_spearman_with_exact_ggn_influence(request, which, capsys) -> None:
    ctx = request.getfixturevalue(which)
    exact = ExactInfluence(curvature="ggn", damping=DAMPING).score(ctx)
    for kind in KINDS:
        approx = EKFACInfluence(kind=kind, damping=DAMPING).score(ctx)
        rho = spearmanr(approx.score, exact.score)[0]
        pearson = pearsonr(approx.score, exact.score)[0]
        with capsys.disabled():
            print(f"\n[{kind} vs if_exact(ggn), {which}] Spearman={rho:.4f} Pearson={pearson:.4f}")
        assert rho > 0.5


def test_huge_damping_reduces_to_the_inner_product_on_a_cnn(cnn) -> None:
    """With D >> curvature, H^{-1} ~ I / D: checks the unfolded Conv2d per-example gradients
    (padding, stride, bias) against autograd's."""
    big = 1e7
    approx = EKFACInfluence(damping=big).score(cnn)
    ip = InnerProduct().score(cnn)
    scale = big + cnn.weight_decay
    np.testing.assert_allclose(approx.score * scale, ip.score, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(approx.suspicion * scale, ip.suspicion, rtol=1e-5)


def test_excluded_parameters_are_listed_and_ignored(digits, kit) -> None:
    """LayerNorm, a bare parameter and a Linear never called in forward are excluded; the
    remaining blocks still reproduce the inner product over their own columns."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(15, 8)
            self.norm = nn.LayerNorm(8)
            self.unused = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3, bias=False)
            self.shift = nn.Parameter(torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.norm(self.first(x)))) + self.shift

    def factory() -> nn.Module:
        torch.manual_seed(0)
        return Net().to(torch.float64)

    model = factory().eval()
    ctx = ScoringContext(
        model_factory=factory,
        checkpoints=[kit.snapshot(model, 0, 1, 1.0)],
        train_ids=np.arange(60),
        train_x=torch.as_tensor(digits["train_x"][:60]),
        train_y=torch.as_tensor(digits["train_y"][:60]),
        target_x=torch.as_tensor(digits["test_x"][:10]),
        target_y=torch.as_tensor(digits["test_y"][:10]),
    )
    blocks, excluded = kronecker_blocks(model)
    assert [b.name for b in blocks] == ["first", "unused", "head"]
    assert excluded == ["shift", "norm.weight", "norm.bias"]  # parameter_order

    estimator = EKFACInfluence(damping=1e8)
    got = estimator.score(ctx)
    assert estimator.excluded_parameters == [
        "shift", "norm.weight", "norm.bias", "unused.weight", "unused.bias"
    ]
    keep = torch.cat([torch.full((p.numel(),), n.split(".")[0] in ("first", "head"))
                      for n, p in model.named_parameters()])
    g = per_sample_gradients(model, ctx.train_x, ctx.train_y)[:, keep]
    g_v = per_sample_gradients(model, ctx.target_x, ctx.target_y).sum(dim=0)[keep]
    expected = g @ g_v
    np.testing.assert_allclose(got.score * 1e8, expected.numpy(), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_positive_spearman_with_leave_one_out(logistic, kind, capsys) -> None:
    ctx = logistic["ctx"]
    attribution = EKFACInfluence(kind=kind).score(ctx)
    score = attribution.score[logistic["removed"]]  # sample_ids follow ctx.train_ids
    np.testing.assert_array_equal(attribution.sample_ids, ctx.train_ids)
    rho = spearmanr(score, logistic["delta"])[0]
    with capsys.disabled():
        print(f"\n[{kind} (default damping) vs LOO] Spearman={rho:.4f}, "
              f"Pearson={pearsonr(score, logistic['delta'])[0]:.4f}")
    assert rho > 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_duplicated_mislabeled_sample_scores_negative(mislabeled_case, kind) -> None:
    ctx = mislabeled_case("linear", COPIES, LAM)
    attribution = EKFACInfluence(kind=kind).score(ctx)
    bad = np.isin(attribution.sample_ids, ctx.train_ids[-COPIES:])
    assert (attribution.score[bad] < 0).all(), attribution.score[bad]
    ranking = np.argsort(-attribution.suspicion, kind="stable")
    assert np.isin(ranking[: COPIES + 3], np.flatnonzero(bad)).sum() == COPIES


@pytest.mark.parametrize("kind", KINDS)
def test_pairwise_columns_sum_to_the_summed_target_score(mlp, kit, kind) -> None:
    kit.assert_pairwise_sums_to_score(EKFACInfluence(kind=kind), mlp, n_targets=40)


@pytest.mark.parametrize("kind", KINDS)
def test_pairwise_stream_scores_batch_by_batch_each_target_alone(mlp, kind) -> None:
    """The stream's blocks are ``batch_size`` train rows; column t equals ``score`` against
    target row t alone (the summed-target path, a different computation) to 1e-10."""
    ctx = dataclasses.replace(mlp, target_x=mlp.target_x[:4], target_y=mlp.target_y[:4],
                              target_ids=np.arange(4) + 700, batch_size=50)
    estimator = EKFACInfluence(kind=kind)
    assert estimator.streams_pairwise()
    stream = estimator.pairwise_stream(ctx)
    blocks = [(ids.copy(), scores.clone()) for ids, scores in stream.blocks]
    assert {len(ids) for ids, _ in blocks[:-1]} == {50} and len(blocks) > 2
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in blocks]), ctx.train_ids)
    np.testing.assert_array_equal(stream.target_ids, ctx.target_ids)
    matrix = torch.cat([scores for _, scores in blocks]).numpy()
    for t in range(4):
        alone = dataclasses.replace(ctx, target_x=ctx.target_x[t : t + 1],
                                    target_y=ctx.target_y[t : t + 1])
        expected = EKFACInfluence(kind=kind).score(alone).score
        np.testing.assert_allclose(matrix[:, t], expected, rtol=1e-10,
                                   atol=1e-10 * np.abs(expected).max())


def test_targets_in_chunks_sized_by_the_memory_budget(mlp) -> None:
    """A budget that fits fewer targets than asked splits them into chunks (factors fitted
    once): the same blocks of train rows and the same scores as all targets at once."""
    ctx = dataclasses.replace(mlp, target_x=mlp.target_x[:7], target_y=mlp.target_y[:7],
                              target_ids=np.arange(7), batch_size=64)
    whole = EKFACInfluence()
    small = EKFACInfluence(target_memory_mb=1)
    model, blocks = small._setup(ctx)
    per_row = 8 * sum(b.module.weight.numel() + (b.bias is not None) * b.module.weight.shape[0]
                      for b in blocks)
    chunk = small.target_chunk(small._factors(ctx, model, blocks))
    assert chunk == max(1, 2**20 // per_row)
    tiny = EKFACInfluence(target_rows=3)  # 3 + 3 + 1 targets
    fits = [(i.copy(), s.clone()) for i, s in whole.pairwise_stream(ctx).blocks]
    chunked = [(i.copy(), s.clone()) for i, s in tiny.pairwise_stream(ctx).blocks]
    assert [len(i) for i, _ in chunked] == [len(i) for i, _ in fits]
    for (ids_a, a), (ids_b, b) in zip(fits, chunked, strict=True):
        np.testing.assert_array_equal(ids_a, ids_b)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="target_memory_mb"):
        EKFACInfluence(target_memory_mb=0)
    with pytest.raises(ValueError, match="target_rows"):
        EKFACInfluence(target_rows=0)


def test_seeded_sampling_and_options(mlp) -> None:
    first = EKFACInfluence().score(mlp)
    again = EKFACInfluence().score(mlp)
    np.testing.assert_array_equal(first.score, again.score)
    subset = EKFACInfluence(max_samples=100).score(mlp)
    assert spearmanr(subset.score, first.score)[0] > 0.8
    with pytest.raises(ValueError, match="kind"):
        EKFACInfluence(kind="diag")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="damping"):
        EKFACInfluence(damping=-1.0)
