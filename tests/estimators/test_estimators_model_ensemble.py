"""ModelEnsemble: an estimator averaged over independently trained models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from estimators.base import Estimator, Needs, PairwiseStream
from estimators.baselines import RandomScores, SelfLoss
from estimators.influence import ExactInfluence
from estimators.inner_product import CosineInnerProduct, InnerProduct
from estimators.iterative_influence import ConjugateGradientInfluence
from estimators.kfac import EKFACInfluence
from estimators.model_ensemble import ModelEnsemble, averages_over_models
from estimators.streamed import gathered, mean_stream
from estimators.tracin import TracIn
from estimators.trak import TRAK

BASES = [InnerProduct, TracIn, ExactInfluence, ConjugateGradientInfluence, EKFACInfluence,
         SelfLoss]


@pytest.fixture(scope="module")
def models(digits, kit):
    """Two MLPs trained from seeds 0 and 1 (4 checkpoints each); contexts with 40 targets."""
    x, y = digits["train_x"], digits["train_y"]
    factory, first = kit.train_mlp(x, y, seed=0)
    _, second = kit.train_mlp(x, y, seed=1)
    tx, ty = digits["test_x"][:40], digits["test_y"][:40]
    single = [kit.make_context(factory, ckpts, x, y, tx, ty, weight_decay=1e-3)
              for ckpts in (first, second)]
    return {"single": single, "ensemble": dataclasses.replace(single[0], extra_models=[second])}


@pytest.mark.parametrize("base", BASES, ids=lambda c: c.name)
def test_one_model_is_the_base_estimator_bit_for_bit(models, base) -> None:
    ctx = models["single"][0]
    expected, got = base().score(ctx), ModelEnsemble(base()).score(ctx)
    np.testing.assert_array_equal(got.sample_ids, expected.sample_ids)
    np.testing.assert_array_equal(got.score, expected.score)
    if expected.suspicion is None:
        assert got.suspicion is None
    else:
        np.testing.assert_array_equal(got.suspicion, expected.suspicion)


@pytest.mark.parametrize("base", BASES, ids=lambda c: c.name)
def test_two_models_give_the_mean_of_each_model_alone(models, base) -> None:
    """Model 1's gradients are computed in memory by the estimator itself (no gradients_for);
    the reference context holds them precomputed in other shards: same numbers."""
    runs = [base().score(ctx) for ctx in models["single"]]
    got = ModelEnsemble(base()).score(models["ensemble"])
    np.testing.assert_array_equal(got.sample_ids, runs[0].sample_ids)
    np.testing.assert_allclose(got.score, (runs[0].score + runs[1].score) / 2,
                               rtol=1e-9, atol=1e-12 * np.abs(runs[0].score).max())
    assert not np.allclose(got.score, runs[0].score, rtol=1e-2)
    if runs[0].suspicion is not None:
        np.testing.assert_allclose(got.suspicion, (runs[0].suspicion + runs[1].suspicion) / 2,
                                   rtol=1e-9)


@pytest.mark.parametrize("base", [InnerProduct, ExactInfluence], ids=lambda c: c.name)
def test_pairwise_is_the_mean_over_models(models, base) -> None:
    runs = [base().pairwise(ctx) for ctx in models["single"]]
    train_ids, target_ids, matrix = ModelEnsemble(base()).pairwise(models["ensemble"])
    np.testing.assert_array_equal(train_ids, runs[0][0])
    np.testing.assert_array_equal(target_ids, runs[0][1])
    assert matrix.shape == (len(train_ids), 40)
    np.testing.assert_allclose(matrix, (runs[0][2] + runs[1][2]) / 2, rtol=1e-9,
                               atol=1e-12 * np.abs(runs[0][2]).max())


@pytest.mark.parametrize("base", [InnerProduct, CosineInnerProduct, TracIn, ExactInfluence,
                                  EKFACInfluence], ids=lambda c: c.name)
def test_streamed_pairwise_equals_the_whole_matrix_mean(models, base) -> None:
    """Block by block (linear bases: model 0's shards of 64 rows and model 1's in-memory blocks
    of 512, cut to common row ranges; EK-FAC: batches of rows): the whole-matrix ensemble."""
    ensemble = ModelEnsemble(base())
    assert ensemble.streams_pairwise()
    train_ids, target_ids, matrix = ensemble.pairwise(models["ensemble"])
    stream = ensemble.pairwise_stream(models["ensemble"])
    blocks = [(ids.copy(), scores.numpy().copy()) for ids, scores in stream.blocks]
    assert len(blocks) > 1 and max(len(ids) for ids, _ in blocks) <= 64
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in blocks]), train_ids)
    np.testing.assert_array_equal(stream.target_ids, target_ids)
    streamed = np.concatenate([s for _, s in blocks])
    np.testing.assert_allclose(streamed, matrix, rtol=1e-12, atol=1e-12 * np.abs(matrix).max())
    alone = base().pairwise(models["single"][0])[2]
    assert np.abs(streamed - alone).max() > 1e-3 * np.abs(alone).max()  # both models count


def _stream(ids: np.ndarray, scores: torch.Tensor, block: int) -> PairwiseStream:
    return PairwiseStream(np.arange(scores.shape[1]), iter(
        [(ids[i : i + block], scores[i : i + block]) for i in range(0, len(ids), block)]))


def test_streamed_members_must_hold_the_same_rows() -> None:
    ids, scores = np.arange(10), torch.arange(30, dtype=torch.float64).reshape(10, 3)
    mean = gathered(mean_stream([_stream(ids, scores, 3), _stream(ids, 3 * scores, 4)]))
    np.testing.assert_array_equal(mean[2], 2 * scores.numpy())
    with pytest.raises(ValueError, match="different orders"):
        gathered(mean_stream([_stream(ids, scores, 3), _stream(ids[::-1], scores, 3)]))
    with pytest.raises(ValueError, match="different numbers of train rows"):
        gathered(mean_stream([_stream(ids, scores, 3), _stream(ids[:-1], scores[:-1], 3)]))
    with pytest.raises(ValueError, match="different target rows"):
        mean_stream([_stream(ids, scores, 3), _stream(ids, scores[:, :2], 3)])
    with pytest.raises(NotImplementedError, match="no streamed"):
        ModelEnsemble(SelfLoss()).pairwise_stream(None)


def test_extra_models_take_gradients_from_gradients_for(models) -> None:
    """Model 0 keeps ctx.gradients; each extra model asks gradients_for with the estimator's
    checkpoints ("all" for TracIn) and the member's own checkpoints."""
    asked, announced = [], []
    second = models["single"][1]

    def gradients_for(member, checkpoints):
        asked.append((member.checkpoints, checkpoints, member.extra_models))
        return second.gradients

    ensemble = ModelEnsemble(TracIn(), gradients_for, lambda m, k: announced.append((m, k)))
    got = ensemble.score(models["ensemble"])
    assert asked == [(second.checkpoints, "all", [])]
    assert announced == [(0, 2), (1, 2)]
    runs = [TracIn().score(ctx) for ctx in models["single"]]
    np.testing.assert_allclose(got.score, (runs[0].score + runs[1].score) / 2, rtol=1e-12)
    assert ensemble.name == "tracin" and ensemble.needs.models


def test_only_estimators_that_read_one_model_are_averaged() -> None:
    assert all(averages_over_models(base()) for base in BASES)
    assert not averages_over_models(RandomScores())
    assert not averages_over_models(TRAK())  # TRAK averages over models itself
    with pytest.raises(ValueError, match="combines models itself"):
        ModelEnsemble(TRAK())


class _FailsOnOtherModels(Estimator):
    """Self-loss on the first model given, a ValueError on any other (as an indefinite Hessian
    raises in if_exact)."""

    name = "fails"
    needs = Needs(model=True)

    def __init__(self, first) -> None:
        self.first = first

    def score(self, ctx):
        if ctx.checkpoints is not self.first:
            raise ValueError("damped curvature is not positive definite")
        return SelfLoss().score(ctx)


def test_an_error_names_the_model_it_came_from(models) -> None:
    ensemble = models["ensemble"]
    with pytest.raises(ValueError, match="fails on model 1 of the ensemble: damped curvature"):
        ModelEnsemble(_FailsOnOtherModels(ensemble.checkpoints)).score(ensemble)


class _OddMembersElsewhere:
    """A ``MemberRunner`` that computes the odd members on a separate, equal ensemble (as a
    worker process would) and the even ones through ``here``."""

    def __init__(self, make, ctx) -> None:
        self.make, self.ctx, self.here_calls = make, ctx, []

    def map(self, method, count, here):
        results = []
        for m in range(count):
            if m % 2:
                results.append(self.make().member_result(self.ctx, method, m))
            else:
                self.here_calls.append((method, m))
                results.append(here(m))
        return results


@pytest.mark.parametrize("base", [InnerProduct, ConjugateGradientInfluence],
                         ids=lambda c: c.name)
def test_members_computed_elsewhere_give_the_same_numbers(models, base) -> None:
    """Through a runner, score and the streamed pairwise equal the one-after-the-other ensemble
    bit for bit; the runner was asked for every member and computed model 1 itself."""
    ctx = models["ensemble"]
    sequential = ModelEnsemble(base())
    runner = _OddMembersElsewhere(lambda: ModelEnsemble(base()), ctx)
    spread = ModelEnsemble(base(), runner=runner)
    np.testing.assert_array_equal(spread.score(ctx).score, sequential.score(ctx).score)
    expected = gathered(sequential.pairwise_stream(ctx))
    got = gathered(spread.pairwise_stream(ctx))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert runner.here_calls == [("score", 0), ("pairwise_vectors", 0)]
