"""train.models = 2 through the real pipeline: every estimator that reads a model writes the mean
of its scores on the two models; model 1's gradients take the form the gradients stage stores."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from estimators.model_ensemble import ModelEnsemble
from estimators.projection import Projector
from estimators.registry import make_estimator
from storage.stored_gradients import StoredGradients
from tasks.config import load_config
from tasks.ensemble import member_gradients, scored_estimator, streamed_member_gradients
from tasks.gradients import shard_gradients
from tasks.score import scoring_context


def _stored(run, name: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(str(run.scores_dir(name, "val_loss") / "part-0.parquet"))
    table = table.sort_by("sample_id")
    return table["sample_id"].to_numpy(), table["score"].to_numpy()


def _alone(run, config, records, name: str, model: int, pairwise: bool = False):
    """What a single-model run scores on ``model``: model 0 with the stored gradients, model 1
    with gradients the estimator computes in memory."""
    own = [dataclasses.replace(r, model=0) for r in records if r.model == model]
    ctx = scoring_context(run, config, own, pairwise=pairwise)
    if model:
        ctx.gradients = None
    estimator = make_estimator(name)
    return estimator.pairwise(ctx) if pairwise else estimator.score(ctx)


def _sorted(attribution) -> np.ndarray:
    return attribution.score[np.argsort(attribution.sample_ids)]


@pytest.mark.parametrize("name", ["ip", "if_cg", "loss"])
def test_scores_are_the_mean_over_the_two_models(ensemble_run, name) -> None:
    run, config, records = ensemble_run
    _, written = _stored(run, name)
    first, second = (_sorted(_alone(run, config, records, name, m)) for m in (0, 1))
    scale = np.abs(first).max()
    np.testing.assert_allclose(written, (first + second) / 2, rtol=1e-4, atol=1e-5 * scale)
    assert np.abs(written - first).max() > 1e-2 * scale  # not the single-model scores


def test_random_scores_are_not_averaged(ensemble_run) -> None:
    run, config, records = ensemble_run
    _, written = _stored(run, "random")
    np.testing.assert_array_equal(written, _sorted(_alone(run, config, records, "random", 0)))
    assert not isinstance(scored_estimator(config, "random"), ModelEnsemble)
    assert isinstance(scored_estimator(config, "if_cg"), ModelEnsemble)
    one = load_config(None, ["train.models=1"])
    assert not isinstance(scored_estimator(one, "ip"), ModelEnsemble)


def test_train_x_test_attributions_are_the_mean(ensemble_run) -> None:
    run, config, records = ensemble_run
    table = pq.read_table(str(run.attributions_dir("ip"))).sort_by([("train_id", "ascending"),
                                                                   ("test_id", "ascending")])
    means = []
    for model in (0, 1):
        train_ids, test_ids, matrix = _alone(run, config, records, "ip", model, pairwise=True)
        means.append(matrix[np.argsort(train_ids)][:, np.argsort(test_ids)])
    expected = ((means[0] + means[1]) / 2).reshape(-1)
    assert len(table) == expected.size == config.targets.test_samples * len(means[0])
    np.testing.assert_allclose(table["score"].to_numpy(), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["ip", "if_cg"])
def test_streamed_attributions_equal_the_whole_matrix_ensemble(ensemble_run, name) -> None:
    """The score stage streamed the two models' mean block by block (model 1's gradients
    computed as read): the numbers of ``ModelEnsemble.pairwise`` (whole matrices averaged,
    model 1's gradients held in memory)."""
    run, config, records = ensemble_run
    estimator = scored_estimator(config, name)
    assert isinstance(estimator, ModelEnsemble) and estimator.streams_pairwise()
    estimator.on_member = None  # it logs to the score task's run logger
    train_ids, test_ids, matrix = estimator.pairwise(scoring_context(run, config, records,
                                                                     pairwise=True))
    table = pq.read_table(str(run.attributions_dir(name)))
    np.testing.assert_array_equal(table["train_id"].to_numpy(), np.repeat(train_ids, len(test_ids)))
    np.testing.assert_array_equal(table["test_id"].to_numpy(), np.tile(test_ids, len(train_ids)))
    np.testing.assert_allclose(table["score"].to_numpy(), matrix.reshape(-1), rtol=1e-12,
                               atol=1e-12 * np.abs(matrix).max())


def test_member_gradients_match_the_stored_shards(ensemble_run) -> None:
    """Applied to model 0, the in-memory form equals what the gradients stage wrote."""
    run, config, records = ensemble_run
    ctx = scoring_context(run, config, [r for r in records if r.model == 0])
    memory = member_gradients(config)(dataclasses.replace(ctx, gradients=None), "final")
    stored = StoredGradients(run, "val")
    final = ctx.final.index
    ids, rows = zip(*stored.train_shards(final), strict=True)
    np.testing.assert_array_equal(np.concatenate(ids), memory.train_ids)
    np.testing.assert_allclose(memory.train_matrix(final), torch.cat(rows), rtol=1e-5,
                               atol=1e-7)
    summed = stored.target(final)  # a float64 sum of float32 rows: rounding-level differences
    np.testing.assert_allclose(memory.target(final), summed, rtol=1e-5,
                               atol=1e-6 * float(summed.abs().max()))


@pytest.mark.parametrize("projection", [None, 64])
def test_streamed_member_gradients_are_the_in_memory_ones_block_by_block(ensemble_run,
                                                                           projection) -> None:
    """Model 1's gradients computed as they are read: the in-memory rows, shard by shard."""
    run, config, records = ensemble_run
    if projection:
        config = load_config(None, [f"gradients.projection={projection}", "estimators=[ip]",
                                    "prune.by=ip", "gradients.shard_size=256"])
    own = [dataclasses.replace(r, model=0) for r in records if r.model == 1]
    ctx = dataclasses.replace(scoring_context(run, config, own, pairwise=True), gradients=None)
    memory = member_gradients(config)(ctx, "final")
    computed = streamed_member_gradients(config)(ctx, "final")
    final = ctx.final.index
    blocks = list(computed.train_shards(final))
    assert [len(ids) for ids, _ in blocks][:-1] == [256] * (len(blocks) - 1) and len(blocks) > 1
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in blocks]), memory.train_ids)
    np.testing.assert_allclose(torch.cat([g for _, g in blocks]), memory.train_matrix(final),
                               rtol=1e-6, atol=1e-8)
    for got, expected in zip(computed.target_rows(final), memory.target_rows(final),
                             strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(computed.target(final), memory.target(final), rtol=1e-9)


def test_member_gradients_are_projected_like_the_gradients_stage(ensemble_run) -> None:
    run, config, records = ensemble_run
    config = load_config(None, ["gradients.projection=64", "estimators=[ip]", "prune.by=ip"])
    own = [dataclasses.replace(r, model=0) for r in records if r.model == 1]
    ctx = scoring_context(run, config, own)
    memory = member_gradients(config)(dataclasses.replace(ctx, gradients=None), "final")
    model = ctx.model_at(ctx.final)
    projector = Projector.for_model(model, 64, seed=config.seed)
    expected = shard_gradients(model, ctx.train_x, ctx.train_y, projector, rows=256)
    assert memory.train_matrix(ctx.final.index).shape == (len(ctx.train_ids), 64)
    np.testing.assert_allclose(memory.train_matrix(ctx.final.index), expected, rtol=1e-5,
                               atol=1e-7)
