"""Streaming scores from a real gradient shard, block by block, against the dense product."""

from __future__ import annotations

import numpy as np
import torch

from estimators.blockwise import stream_scores
from storage.gradient_shards import ShardMeta, iter_gradient_blocks, write_gradient_shard


def test_streamed_shard_scores_equal_the_dense_product(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(2500, 48, generator=gen)  # 3 row groups of <= 1024 rows
    targets = torch.randn(7, 48, generator=gen)
    ids = np.arange(100, 2600, dtype=np.int64)
    meta = ShardMeta(dtype="float32", projection=None, k=48, seed=None, parameter_order=["w"],
                     parameter_count=48, checkpoint=0, model_hash="h", split="train")
    path = tmp_path / "part-0.parquet"
    write_gradient_shard(path, ids, grads, meta)

    blocks = []
    summary = stream_scores(iter_gradient_blocks(path, row_groups=2), targets,
                            sink=lambda i, s: blocks.append((i.copy(), s.clone())))
    dense = grads @ targets.T
    sizes = [len(i) for i, _ in blocks]  # at most 2 row groups of 1024 rows per block
    assert len(sizes) >= 2 and max(sizes) <= 2048 and sum(sizes) == 2500
    np.testing.assert_array_equal(np.concatenate([i for i, _ in blocks]), ids)
    torch.testing.assert_close(torch.cat([s for _, s in blocks]), dense)
    np.testing.assert_array_equal(summary.sample_ids, ids)
    np.testing.assert_allclose(summary.summed, dense.double().sum(1).numpy(), rtol=1e-5,
                               atol=1e-4)  # float32 rounding, values up to ~30
    np.testing.assert_array_equal(summary.worst, dense.min(1).values.numpy())
    np.testing.assert_array_equal(summary.worst_target, dense.argmin(1).numpy())
