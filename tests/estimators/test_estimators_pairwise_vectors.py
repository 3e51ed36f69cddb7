"""``pairwise_vectors``: the estimators linear in the train gradients expose (T, k) target
vectors, scored block by block by ``blockwise.stream_pairwise``; the rest keep ``pairwise``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from estimators import ESTIMATORS, Estimator, make_estimator
from estimators.blockwise import stream_pairwise

LINEAR = {"ip", "cosine", "tracin", "if_exact", "if_cg", "if_lissa", "if_arnoldi", "datainf"}


@pytest.fixture(scope="module")
def ctx(kit, digits):
    torch.manual_seed(0)
    model = kit.mlp_factory()()
    checkpoints = [kit.snapshot(model, 0, 0, 0.1)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    checkpoints.append(kit.snapshot(model, 1, 10, 0.05))
    return kit.make_context(kit.mlp_factory(), checkpoints, digits["train_x"][:150],
                            digits["train_y"][:150], digits["test_x"][:9], digits["test_y"][:9])


def test_exactly_the_linear_estimators_have_target_vectors() -> None:
    linear = {name for name, cls in ESTIMATORS.items()
              if cls.pairwise_vectors is not Estimator.pairwise_vectors}
    assert linear == LINEAR
    with pytest.raises(NotImplementedError, match="no linear train x test form"):
        make_estimator("trak").pairwise_vectors(None)


def test_streamed_estimators_are_the_linear_ones_and_ekfac() -> None:
    """``pairwise_stream`` (scores computed per block of train rows from the model): EK-FAC;
    TRAK, ip_ensemble and diffin keep the whole matrix."""
    streamed = {name for name in ESTIMATORS if make_estimator(name).streams_pairwise()}
    assert streamed == LINEAR | {"if_ekfac"}
    with pytest.raises(NotImplementedError, match="no streamed train x test form"):
        make_estimator("trak").pairwise_stream(None)


@pytest.mark.parametrize("name", ["ip", "cosine", "tracin"])
def test_blocks_reach_the_sink_one_shard_at_a_time(ctx, name) -> None:
    estimator = make_estimator(name)
    vectors = estimator.pairwise_vectors(ctx)
    k = ctx.gradients.train_matrix(0).shape[1]
    expected = {c.index for c in ctx.checkpoints} if name == "tracin" else {ctx.final.index}
    assert set(vectors.vectors) == expected
    assert all(v.shape == (9, k) and v.dtype == torch.float64 for v in vectors.vectors.values())
    blocks = []
    stream_pairwise(ctx.gradients, vectors,
                    lambda ids, scores: blocks.append((ids.copy(), scores.clone())))
    assert [len(ids) for ids, _ in blocks] == [64, 64, 22]  # the source's shards
    train_ids, target_ids, matrix = estimator.pairwise(ctx)
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in blocks]), train_ids)
    np.testing.assert_array_equal(target_ids, vectors.target_ids)
    np.testing.assert_array_equal(torch.cat([s for _, s in blocks]).numpy(), matrix)


def test_checkpoints_must_stream_the_same_rows_in_step(ctx) -> None:
    vectors = make_estimator("tracin").pairwise_vectors(ctx)

    class Shuffled:
        """Checkpoint 1 yields its rows in another order."""

        def train_shards(self, checkpoint: int):
            order = np.arange(150)[::-1].copy() if checkpoint == 1 else np.arange(150)
            grads = ctx.gradients.train_matrix(checkpoint)
            yield ctx.train_ids[order], grads[order]

    with pytest.raises(ValueError, match="same row order and blocks at every checkpoint"):
        stream_pairwise(Shuffled(), vectors, lambda ids, scores: None)
