"""Train x test attributions on disk, written part by part and committed whole.

``attributions/estimator=<e>/part-<k>.parquet`` holds rows (train_id int64, test_id int64,
score float64; project sign, > 0 = the training sample is beneficial to that test sample),
train-major: each part covers consecutive training rows against every test id. Parts are
written into a hidden staging folder next to the estimator's folder, which replaces the old
folder only once every part is written; an error (e.g. a gradient shard that fails its checksum
after its blocks were scored) deletes the staging folder and leaves the old attributions as they
were. Memory: one part (``part_rows`` score rows) and one block, whatever n.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from upath import UPath

from estimators.base import (
    Estimator,
    PairwiseStream,
    ScoringContext,
)
from estimators.streamed import pairwise_stream
from storage.atomic import process_alive, write_parquet_atomic

ATTRIBUTION_SCHEMA = pa.schema(
    [("train_id", pa.int64()), ("test_id", pa.int64()), ("score", pa.float64())]
)
PART_ROWS = 1 << 20
"""Score rows a part holds at most (unless one block has more): about 24 MiB of Parquet."""
_STAGING = re.compile(r"\.tmp-(\d+)-[0-9a-f]+(-replaced)?$")


class AttributionParts:
    """A ``stream_pairwise`` sink: keeps (train ids (m,), scores (m, T)) blocks and writes
    ``part-<k>.parquet`` into ``directory`` whenever ``part_rows`` score rows are held; ``close``
    writes the rest and returns the number of parts."""

    def __init__(self, directory: Path, test_ids: np.ndarray, part_rows: int = PART_ROWS) -> None:
        if part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {part_rows}")
        self.directory = directory
        self.test_ids = np.asarray(test_ids, dtype=np.int64)
        self.part_rows = part_rows
        self.parts = 0
        self._ids: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._held = 0

    def __call__(self, train_ids: np.ndarray, scores: torch.Tensor | np.ndarray) -> None:
        values = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else scores
        if values.shape != (len(train_ids), len(self.test_ids)):
            raise ValueError(f"a block of {len(train_ids)} train ids has scores of shape "
                             f"{values.shape}, expected (m, {len(self.test_ids)})")
        self._ids.append(np.array(train_ids, dtype=np.int64))
        self._scores.append(np.array(values, dtype=np.float64))
        self._held += values.size
        if self._held >= self.part_rows:
            self._flush()

    def close(self) -> int:
        if self._held or not self.parts:
            self._flush()
        return self.parts

    def _flush(self) -> None:
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, dtype=np.int64)
        width = len(self.test_ids)
        scores = (np.concatenate(self._scores) if self._scores
                  else np.zeros((0, width), dtype=np.float64))
        table = pa.table({
            "train_id": pa.array(np.repeat(ids, width), pa.int64()),
            "test_id": pa.array(np.tile(self.test_ids, len(ids)), pa.int64()),
            "score": pa.array(scores.reshape(-1), pa.float64()),
        }, schema=ATTRIBUTION_SCHEMA)
        write_parquet_atomic(table, self.directory / f"part-{self.parts}.parquet")
        self.parts += 1
        self._ids, self._scores, self._held = [], [], 0


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield a new, empty hidden folder next to ``final`` (``.{name}.tmp-{pid}-{hex}``); on
    normal exit it replaces ``final`` whole (the old folder is moved aside, then deleted), on an
    exception it is deleted and ``final`` is untouched. Staging folders of local writers that
    died are deleted first. ``final`` may be a URL's ``UPath`` (``_staged_objects``)."""
    if not isinstance(final, Path):
        with _staged_objects(final) as staging:
            yield staging
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        m = _STAGING.search(stale.name)
        if m and stale.is_dir() and not process_alive(int(m.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    staging = final.parent / f".{final.name}.tmp-{tag}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = final.parent / f".{final.name}.tmp-{tag}-replaced"
    if final.exists():
        final.rename(replaced)
    staging.rename(final)
    shutil.rmtree(replaced, ignore_errors=True)


@contextmanager
def _staged_objects(final: UPath) -> Iterator[UPath]:
    """``staged_directory`` on an object store, which has no renames: the parts go under a
    hidden staging prefix, deleted on an error; once all are written the old objects under
    ``final`` are deleted and the staged ones moved there (copies). An error never commits
    anything, but the swap itself is not atomic: a reader during it may find some parts."""
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield staging
    except BaseException:
        if staging.exists():
            staging.fs.rm(staging.path, recursive=True)
        raise
    if final.exists():
        final.fs.rm(final.path, recursive=True)
    parts = final.fs.find(staging.path)  # object by object: s3fs's recursive mv copies the
    final.fs.copy(parts, [final.path + p[len(staging.path):] for p in parts])  # folder key too
    final.fs.rm(staging.path, recursive=True)


def write_attributions(
    directory: Path, train_ids: np.ndarray, test_ids: np.ndarray, matrix: np.ndarray,
    part_rows: int = PART_ROWS, block: int = 1024,
) -> int:
    """Write a whole (n_train, n_test) score matrix the same way (the same rows in the same
    order as the streamed writer), ``block`` train rows at a time; returns the number of parts."""
    with staged_directory(directory) as staging:
        parts = AttributionParts(staging, test_ids, part_rows)
        for start in range(0, len(train_ids), block):
            parts(train_ids[start : start + block], matrix[start : start + block])
        return parts.close()


def write_stream(directory: Path, stream: PairwiseStream, part_rows: int = PART_ROWS) -> int:
    """Write a ``PairwiseStream``'s blocks into ``directory``'s parts as they come (staged,
    committed only when the stream ends); returns the number of parts. Memory: one block and
    one part, whatever n."""
    with staged_directory(directory) as staging:
        parts = AttributionParts(staging, stream.target_ids, part_rows)
        blocks = 0
        for ids, scores in stream.blocks:
            parts(ids, scores)
            blocks += 1
        if not blocks:
            raise ValueError("the stream yielded no train blocks")
        return parts.close()


def write_pairwise(directory: Path, estimator: Estimator, ctx: ScoringContext) -> int:
    """Write ``estimator``'s train x test attributions into ``directory``; returns the number
    of parts. Estimators that stream (``Estimator.streams_pairwise``) are written block by
    block from ``streamed.pairwise_stream`` (memory independent of n: linear ones from
    ``ctx.gradients``, EK-FAC from the model, a model ensemble as the mean of its members'
    blocks); the others gather ``pairwise``'s (n, m) matrix first."""
    if estimator.streams_pairwise():
        return write_stream(directory, pairwise_stream(estimator, ctx))
    return write_attributions(directory, *estimator.pairwise(ctx))
