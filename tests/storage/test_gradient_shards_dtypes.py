"""Gradient shards stored as float16 / bfloat16: half the bytes, read back as float32 rows
equal to the 16-bit values, checksummed like float32 shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.errors import BadInput
from storage.gradient_shards import (
    STORED_DTYPES,
    ShardMeta,
    iter_gradient_blocks,
    read_gradient_shard,
    read_shard_meta,
    write_gradient_shard,
)


def _meta(dtype: str, k: int) -> ShardMeta:
    return ShardMeta(dtype=dtype, projection=None, k=k, seed=None, parameter_order=["w"],
                     parameter_count=k, checkpoint=0, model_hash="h", split="train")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_shards_round_trip_at_half_the_size(tmp_path, dtype) -> None:
    grads = torch.randn(1500, 96, generator=torch.Generator().manual_seed(0))
    ids = np.arange(1500, dtype=np.int64) * 2
    wide, narrow = tmp_path / "wide.parquet", tmp_path / "narrow.parquet"
    write_gradient_shard(wide, ids, grads, _meta("float32", 96))
    write_gradient_shard(narrow, ids, grads, _meta(dtype, 96))

    assert read_shard_meta(narrow).dtype == dtype
    assert narrow.stat().st_size < 0.6 * wide.stat().st_size
    got_ids, got = read_gradient_shard(narrow)
    expected = grads.to(STORED_DTYPES[dtype]).to(torch.float32)
    np.testing.assert_array_equal(got_ids, ids)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected) and not torch.equal(got, grads)
    blocks = list(iter_gradient_blocks(narrow, row_groups=1))
    assert torch.equal(torch.cat([b for _, b in blocks]), expected)


def test_a_changed_byte_in_a_16_bit_shard_fails_the_checksum(tmp_path) -> None:
    path = tmp_path / "part-0.parquet"
    grads = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    write_gradient_shard(path, np.arange(64), grads, _meta("bfloat16", 32))
    data = bytearray(path.read_bytes())
    middle = len(data) // 3  # inside the gradient column's data page
    data[middle] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="corrupted gradient shard"):
        read_gradient_shard(path)


def test_unknown_dtypes_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="unsupported shard dtype"):
        write_gradient_shard(tmp_path / "x.parquet", np.arange(2), torch.zeros(2, 3),
                             _meta("int8", 3))
