"""The streaming shard reader checks the same sha256 as the full read, in one pass: both agree
on sound shards, both refuse a changed gradient byte or id byte, and the streaming reader
raises only after its last block (so its consumer commits only on a clean end)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from storage.errors import BadInput
from storage.gradient_shards import (
    ShardMeta,
    iter_gradient_blocks,
    read_gradient_shard,
    write_gradient_shard,
)

ROWS, K = 2500, 24  # three row groups of <= 1024 rows


def _meta(dtype: str = "float32") -> ShardMeta:
    return ShardMeta(dtype=dtype, projection=None, k=K, seed=None, parameter_order=["w"],
                     parameter_count=K, checkpoint=0, model_hash="h", split="train")


def _shard(tmp_path, dtype: str = "float32"):
    path = tmp_path / "part-0.parquet"
    grads = torch.randn(ROWS, K, generator=torch.Generator().manual_seed(3))
    ids = np.arange(ROWS, dtype=np.int64) * 7 + 1_000_003
    write_gradient_shard(path, ids, grads, _meta(dtype))
    return path, ids, grads


def _flip(path, needle: bytes) -> None:
    """Change one bit of the only occurrence of ``needle`` in the file."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at + len(needle) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_blocks_equal_the_full_read_and_pass_the_check(tmp_path, dtype) -> None:
    path, ids, _ = _shard(tmp_path, dtype)
    full_ids, full = read_gradient_shard(path)
    for row_groups in (1, 2):
        blocks = [(i.copy(), g.clone()) for i, g in iter_gradient_blocks(path, row_groups)]
        assert len(blocks) >= 2 and max(len(i) for i, _ in blocks) <= 1024 * row_groups
        np.testing.assert_array_equal(np.concatenate([i for i, _ in blocks]), full_ids)
        assert torch.equal(torch.cat([g for _, g in blocks]), full)
    np.testing.assert_array_equal(full_ids, ids)


def test_the_checksum_is_the_one_existing_shards_hold(tmp_path) -> None:
    """sha256(metadata JSON, ids as <i8, gradients as <f4): unchanged, so shards written before
    streaming verification existed verify on both paths (no format version needed)."""
    path, ids, grads = _shard(tmp_path)
    meta_json = json.dumps(asdict(_meta())).encode()
    expected = hashlib.sha256(meta_json + ids.astype("<i8").tobytes()
                              + grads.numpy().astype("<f4").tobytes()).hexdigest()
    assert pq.read_schema(path).metadata[b"sieve.sha256"].decode() == expected


@pytest.mark.parametrize("where", ["gradient", "id"])
def test_a_changed_byte_is_caught_by_both_readers_after_the_last_block(tmp_path, where) -> None:
    path, ids, grads = _shard(tmp_path)
    needle = (grads[1800].numpy().astype("<f4").tobytes() if where == "gradient"
              else ids[1500:1502].astype("<i8").tobytes())
    _flip(path, needle)
    with pytest.raises(BadInput, match=r"^corrupted gradient shard .*part-0\.parquet: checksum "
                                       r"mismatch \(the file changed after it was written\)$"):
        read_gradient_shard(path)
    seen = 0
    with pytest.raises(BadInput, match=r"^corrupted gradient shard .*: checksum mismatch"):
        for block_ids, _ in iter_gradient_blocks(path, row_groups=1):
            seen += len(block_ids)
    assert seen == ROWS  # every block came first: the error ends the stream, before a commit
    unchecked = sum(len(i) for i, _ in iter_gradient_blocks(path, verify=False))
    assert unchecked == ROWS


def test_a_shard_without_a_checksum_is_refused_by_both(tmp_path) -> None:
    path, _, _ = _shard(tmp_path)
    table = pq.read_table(path)
    metadata = {k: v for k, v in table.schema.metadata.items() if k != b"sieve.sha256"}
    pq.write_table(table.replace_schema_metadata(metadata), path, compression="none")
    with pytest.raises(BadInput, match="no checksum"):
        read_gradient_shard(path)
    with pytest.raises(BadInput, match="no checksum"):
        list(iter_gradient_blocks(path))
