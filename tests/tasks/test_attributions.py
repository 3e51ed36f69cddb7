"""Train x test attributions streamed from a run's stored gradient shards, block by block:
the same table as the whole-matrix formulas for every estimator linear in the train gradients,
several parts, a damaged shard refused with nothing committed, and peak memory that does not
grow with the number of training samples."""

from __future__ import annotations

import tracemalloc
from functools import partial

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from benchmarks._measure import release_memory
from estimators import Checkpoint, InMemoryGradients, PairwiseVectors, ScoringContext
from estimators.base import PairwiseStream
from estimators.blockwise import pairwise_blocks
from estimators.influence import curvature_matrix
from estimators.registry import make_estimator
from estimators.streamed import pairwise_stream
from storage.atomic import read_parquet_table
from storage.errors import BadInput
from storage.gradient_shards import (
    ShardMeta,
    complete_shards,
    read_gradient_shard,
    write_gradient_shard,
)
from storage.store import RunPaths, Store
from storage.stored_gradients import StoredGradients
from tasks.attributions import (
    AttributionParts,
    staged_directory,
    write_attributions,
    write_pairwise,
    write_stream,
)
from tasks.memory import peak_memory

N_TRAIN, N_TEST, FEATURES, SHARD = 150, 12, 5, 32  # 5 shards: the last one short
WEIGHT_DECAY = 1e-3
OPTIONS = {"if_lissa": {"depth": 60, "batch": 50}, "if_arnoldi": {"n_iter": 30, "rank": 20}}


def _factory() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.float64)


def _write_split(run: RunPaths, checkpoint: int, split: str, ids: np.ndarray,
                 grads: torch.Tensor) -> None:
    meta = ShardMeta(dtype="float32", projection=None, k=grads.shape[1], seed=None,
                     parameter_order=["all"], parameter_count=grads.shape[1],
                     checkpoint=checkpoint, model_hash="test", split=split)
    for part, start in enumerate(range(0, len(ids), SHARD)):
        write_gradient_shard(run.gradients_dir(checkpoint, split) / f"part-{part}.parquet",
                             ids[start : start + SHARD], grads[start : start + SHARD], meta)


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> tuple[RunPaths, ScoringContext]:
    """A trained MLP's two checkpoints and their per-sample gradients in a run's shards."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(N_TRAIN + N_TEST, FEATURES)))
    y = torch.as_tensor((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())
    torch.manual_seed(0)
    model = _factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    checkpoints = []
    for index in range(2):
        for _ in range(30):
            loss = nn.functional.cross_entropy(model(x[:N_TRAIN]), y[:N_TRAIN])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        checkpoints.append(Checkpoint(index, 30 * (index + 1), 0.2 / (index + 1),
                                      load=lambda state=state: state))
    train_ids = np.arange(N_TRAIN, dtype=np.int64) + 500
    test_ids = np.arange(N_TEST, dtype=np.int64) * 3 + 10_000
    memory = InMemoryGradients.compute(_factory, checkpoints, train_ids, x[:N_TRAIN],
                                       y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:],
                                       target_ids=test_ids)
    run = Store(tmp_path_factory.mktemp("store")).run("streamed")
    for c in checkpoints:
        _write_split(run, c.index, "train", train_ids, memory.train_matrix(c.index))
        _write_split(run, c.index, "test", test_ids, memory.target_rows(c.index)[1])
    ctx = ScoringContext(model_factory=_factory, checkpoints=checkpoints, train_ids=train_ids,
                         train_x=x[:N_TRAIN], train_y=y[:N_TRAIN], target_x=x[N_TRAIN:],
                         target_y=y[N_TRAIN:], gradients=StoredGradients(run, "test", test_ids),
                         weight_decay=WEIGHT_DECAY, target_ids=test_ids)
    return run, ctx


def _full(run: RunPaths, checkpoint: int, split: str) -> torch.Tensor:
    """Every stored row of a split, (rows, d) float64 (the float32 values read back)."""
    paths = complete_shards(run.gradients_dir(checkpoint, split))
    return torch.cat([read_gradient_shard(p)[1] for p in paths]).to(torch.float64)


def _reference(name: str, estimator, run: RunPaths, ctx: ScoringContext) -> np.ndarray:
    """The whole (n, T) matrix by the formulas the estimators' ``pairwise`` used before
    streaming: dense products of every stored train row with the solved target rows."""
    last = ctx.final.index
    g, t = _full(run, last, "train"), _full(run, last, "test")
    if name == "ip":
        return (g @ t.T).numpy()
    if name == "cosine":
        def unit(rows: torch.Tensor) -> torch.Tensor:
            return rows / (torch.linalg.vector_norm(rows, dim=1, keepdim=True) + 1e-12)
        return (unit(g) @ unit(t).T).numpy()
    if name == "tracin":
        return sum(c.lr * (_full(run, c.index, "train") @ _full(run, c.index, "test").T)
                   for c in ctx.checkpoints).numpy()
    if name == "if_exact":
        h = curvature_matrix(ctx.model_at(ctx.final), ctx.train_x, ctx.train_y, kind="ggn")
        h = (h + h.T) / 2 + (WEIGHT_DECAY + estimator.damping_used) * torch.eye(h.shape[0],
                                                                           dtype=h.dtype)
        return (g @ torch.linalg.solve(h, t.T)).numpy()
    if name == "datainf":
        layers = estimator._layers(ctx, g.shape[1])
        h, *_ = estimator._inverse_targets(ctx.gradients, last, layers, t, WEIGHT_DECAY, False)
        return (g @ h.T).numpy()
    solve = estimator._solver(ctx, estimator._problem(ctx))  # if_cg, if_lissa, if_arnoldi
    return (g @ solve(t.T)).numpy()


def _table(directory) -> pa.Table:
    parts = sorted(directory.glob("part-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))
    return pa.concat_tables([read_parquet_table(p) for p in parts])


@pytest.mark.parametrize("name", ["ip", "cosine", "tracin", "if_exact", "if_cg", "if_lissa",
                                  "if_arnoldi", "datainf"])
def test_streamed_attributions_equal_the_whole_matrix_table(stored, tmp_path, name) -> None:
    run, ctx = stored
    estimator = make_estimator(name, **OPTIONS.get(name, {}))
    streamed, whole = tmp_path / "streamed", tmp_path / "whole"
    parts = write_pairwise(streamed, estimator, ctx)  # the score stage's call
    matrix = _reference(name, estimator, run, ctx)
    write_attributions(whole, ctx.train_ids, ctx.target_ids, matrix)
    assert parts == 1 and len(list(streamed.iterdir())) == 1
    got, expected = _table(streamed), _table(whole)
    assert got.num_rows == N_TRAIN * N_TEST
    for column in ("train_id", "test_id"):
        np.testing.assert_array_equal(got[column].to_numpy(), expected[column].to_numpy())
    score, reference = got["score"].to_numpy(), expected["score"].to_numpy()
    scale = np.abs(reference).max()
    assert scale > 0
    np.testing.assert_allclose(score, reference, rtol=1e-12, atol=1e-12 * scale)


def test_ekfac_attributions_are_written_block_by_block(stored, tmp_path) -> None:
    """EK-FAC streams batches of train rows from the model (no stored gradients): the table of
    its whole ``pairwise`` matrix, one part per batch with small parts; a stream that fails
    midway commits nothing."""
    _, ctx = stored
    estimator = make_estimator("if_ekfac")
    assert estimator.streams_pairwise() and not make_estimator("trak").streams_pairwise()
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    write_attributions(whole, *estimator.pairwise(ctx))
    batches = -(-N_TRAIN // ctx.batch_size)
    stream = pairwise_stream(estimator, ctx)
    assert write_stream(streamed, stream, part_rows=ctx.batch_size * N_TEST) == batches
    got, expected = _table(streamed), _table(whole)
    assert got.num_rows == N_TRAIN * N_TEST
    for column in ("train_id", "test_id"):
        np.testing.assert_array_equal(got[column].to_numpy(), expected[column].to_numpy())
    np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(),
                               rtol=1e-10, atol=1e-10 * np.abs(expected["score"]).max())
    before = {p.name: p.read_bytes() for p in streamed.iterdir()}

    def failing():
        yield from list(pairwise_stream(estimator, ctx).blocks)[:2]
        raise ValueError("curvature went bad")

    with pytest.raises(ValueError, match="curvature went bad"):
        write_stream(streamed, PairwiseStream(stream.target_ids, failing()), part_rows=1)
    assert {p.name: p.read_bytes() for p in streamed.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed", "whole"]


def test_small_parts_and_a_damaged_shard_commit_nothing(stored, tmp_path) -> None:
    run, ctx = stored
    estimator = make_estimator("tracin")
    vectors = estimator.pairwise_vectors(ctx)
    out = tmp_path / "attributions" / "estimator=tracin"
    blocks = -(-N_TRAIN // SHARD)
    assert _write_vectors(out, ctx.gradients, vectors,
                                       part_rows=SHARD * N_TEST) == blocks
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == [f"part-{k}.parquet" for k in range(blocks)]
    assert _table(out).num_rows == N_TRAIN * N_TEST

    damaged = complete_shards(run.gradients_dir(1, "train"))[-2]
    original = damaged.read_bytes()
    data = bytearray(original)
    data[len(data) // 3] ^= 0x01
    damaged.write_bytes(bytes(data))
    try:
        with pytest.raises(BadInput, match=r"^corrupted gradient shard .*checksum mismatch"):
            _write_vectors(out, ctx.gradients, vectors, part_rows=SHARD * N_TEST)
    finally:
        damaged.write_bytes(original)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old parts, whole
    assert [p.name for p in out.parent.iterdir()] == ["estimator=tracin"]  # no staging left


def _random_run(root, n: int, k: int, seed: int) -> StoredGradients:
    run = Store(root).run(f"n{n}")
    rows = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    meta = ShardMeta(dtype="float32", projection="random", k=k, seed=seed,
                     parameter_order=["all"], parameter_count=k, checkpoint=0,
                     model_hash="test", split="train")
    for part, start in enumerate(range(0, n, 1024)):
        write_gradient_shard(run.gradients_dir(0, "train") / f"part-{part}.parquet",
                             np.arange(start, min(start + 1024, n)), rows[start : start + 1024],
                             meta)
    return StoredGradients(run, "test")


def _peaks(write) -> dict[str, float]:
    """Peak MiB above the start while ``write()`` runs: the process's RSS (every allocator,
    sampled each ms), numpy and Python objects (tracemalloc) and Arrow buffers (a proxy pool)."""
    release_memory()  # start each from a trimmed heap
    arrow, previous = pa.proxy_memory_pool(pa.default_memory_pool()), pa.default_memory_pool()
    pa.set_memory_pool(arrow)
    tracemalloc.start()
    try:
        with peak_memory(interval=0.001) as rss:
            write()
        python = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    return {"rss": rss.delta_mb, "python": python / 2**20, "arrow": arrow.max_memory() / 2**20}


def test_peak_memory_does_not_grow_with_the_training_set(tmp_path) -> None:
    """n and 2n rows against T = 512 targets: the (n, T) float64 matrix would be 64 and 128
    MiB. The streamed writer holds one block and one part: its numpy and Arrow peaks (exact
    counts) stay put when n doubles, and its RSS peak (every allocator, torch's included, but
    noisy: allocators keep freed pages a while) stays far below the matrix."""
    torch.set_num_threads(1)
    k, targets, n = 32, 512, 16384
    vectors = PairwiseVectors(np.arange(targets, dtype=np.int64),
                              {0: torch.randn(targets, k, generator=torch.Generator()
                                              .manual_seed(1), dtype=torch.float64)})
    peaks = {}
    for rows in (n // 8, n, 2 * n):  # the first run pays one-time allocations
        source = _random_run(tmp_path / "store", rows, k, seed=rows)
        out = tmp_path / f"att-{rows}"
        peaks[rows] = _peaks(partial(_write_vectors, out, source, vectors,
                                     part_rows=1 << 18))
        assert len(list(out.iterdir())) == rows // 1024  # a block's 1024 x 512 scores a part
    matrix = 2 * n * targets * 8 / 2**20  # 128 MiB
    for kind in ("python", "arrow"):
        assert peaks[2 * n][kind] <= 1.05 * peaks[n][kind] + 1, (kind, peaks)
        assert peaks[2 * n][kind] < matrix / 4, (kind, peaks)
    assert peaks[2 * n]["rss"] < matrix, peaks  # gathering needs the matrix and its copies


def test_an_object_store_folder_is_replaced_only_after_every_part(tmp_path) -> None:
    """A URL (fsspec's in-memory filesystem): the same staging, by prefix instead of renames."""
    from upath import UPath

    final = UPath(f"memory://sieve-test/{tmp_path.name}/attributions/estimator=ip")
    ids, tests = np.arange(300), np.arange(4)
    assert write_attributions(final, ids, tests, np.ones((300, 4)), part_rows=400, block=100) == 3
    with pytest.raises(RuntimeError, match="stopped"), staged_directory(final) as staging:
        AttributionParts(staging, tests, part_rows=4)(ids[:5], np.zeros((5, 4)))
        raise RuntimeError("stopped")
    assert sorted(p.name for p in final.iterdir()) == ["part-0.parquet", "part-1.parquet",
                                                      "part-2.parquet"]
    assert [p.name for p in final.parent.iterdir()] == ["estimator=ip"]
    assert write_attributions(final, ids[:10], tests, np.zeros((10, 4))) == 1
    assert [p.name for p in final.iterdir()] == ["part-0.parquet"]
    assert read_parquet_table(final / "part-0.parquet").num_rows == 40


def _write_vectors(out, source, vectors: PairwiseVectors, part_rows: int) -> int:
    """The score stage's streamed writer for a linear estimator: ``source``'s train blocks
    against ``vectors``, written part by part."""
    stream = PairwiseStream(np.asarray(vectors.target_ids, dtype=np.int64),
                            pairwise_blocks(source, vectors))
    return write_stream(out, stream, part_rows=part_rows)
