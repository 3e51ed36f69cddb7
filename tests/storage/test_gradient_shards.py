import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from storage.errors import BadInput
from storage.gradient_shards import (
    ShardMeta,
    complete_shards,
    read_gradient_shard,
    read_shard_meta,
    shard_path,
    write_gradient_shard,
)


def _meta(k: int) -> ShardMeta:
    return ShardMeta(
        dtype="float32",
        projection="gaussian",
        k=k,
        seed=7,
        parameter_order=["fc1.weight", "fc1.bias"],
        parameter_count=1234,
        checkpoint=2,
        model_hash="abc123",
        split="train",
    )


def _grads(m: int, k: int) -> torch.Tensor:
    g = torch.randn(m, k, generator=torch.Generator().manual_seed(0))
    g[0, 0] = float("nan")  # bit-exact means NaN payloads and signed zeros survive too
    g[0, 1] = -0.0
    g[1, 0] = float("inf")
    return g


@pytest.mark.parametrize("m", [1, 1023, 1024, 2500])  # around the 1024-row row groups
def test_round_trip_is_bit_exact(tmp_path: Path, m: int) -> None:
    k = 37
    ids = np.arange(m, dtype=np.int64) * 3 + 5
    g = _grads(max(m, 2), k)[:m]
    path = shard_path(tmp_path, 0)
    write_gradient_shard(path, ids, g, _meta(k))
    got_ids, got = read_gradient_shard(path)
    assert got_ids.dtype == np.int64
    np.testing.assert_array_equal(got_ids, ids)
    assert got.dtype == torch.float32 and got.shape == (m, k) and got.is_contiguous()
    assert torch.equal(got.view(torch.int32), g.view(torch.int32))
    assert read_shard_meta(path) == _meta(k)


def test_file_layout(tmp_path: Path) -> None:
    k = 16
    path = shard_path(tmp_path, 3)
    assert path == tmp_path / "part-3.parquet"
    write_gradient_shard(path, np.arange(3000), torch.ones(3000, k), _meta(k))
    f = pq.ParquetFile(path)
    assert f.schema_arrow.field("sample_id").type == pa.int64()
    assert f.schema_arrow.field("grad").type == pa.binary(4 * k)
    assert json.loads(f.schema_arrow.metadata[b"sieve"])["k"] == k
    md = f.metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [1024, 1024, 952]
    col = md.row_group(0).column(1)
    assert col.compression == "UNCOMPRESSED"
    assert not any("DICT" in e for e in col.encodings)
    # the bytes are raw little-endian float32
    raw = pq.read_table(path).column("grad")[0].as_py()
    assert raw == np.ones(k, dtype="<f4").tobytes()


def test_non_contiguous_and_grad_tracking_tensors(tmp_path: Path) -> None:
    base = torch.randn(8, 5, requires_grad=True)
    g = base.t()  # (5, 8), not contiguous, requires grad
    write_gradient_shard(shard_path(tmp_path, 0), np.arange(5), g, _meta(8))
    _, got = read_gradient_shard(shard_path(tmp_path, 0))
    assert torch.equal(got, g.detach())


def test_mismatched_shapes_are_programming_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="k=4"):
        write_gradient_shard(tmp_path / "p.parquet", np.arange(2), torch.zeros(2, 3), _meta(4))
    with pytest.raises(ValueError):
        write_gradient_shard(tmp_path / "p.parquet", np.arange(3), torch.zeros(2, 4), _meta(4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [0, 10, 0.5, -8, -1])
def test_truncated_shard_raises_bad_input(tmp_path: Path, cut: float) -> None:
    path = shard_path(tmp_path, 0)
    write_gradient_shard(path, np.arange(100), torch.randn(100, 8), _meta(8))
    data = path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    path.write_bytes(data[:n])
    for read in (read_gradient_shard, read_shard_meta):
        with pytest.raises(BadInput, match=r"^corrupted gradient shard .*part-0\.parquet: "):
            read(path)


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "part-0.parquet"
    path.write_bytes(b"PAR1" + b"\x00" * 200 + b"PAR1")
    with pytest.raises(BadInput, match="corrupted gradient shard"):
        read_gradient_shard(path)
    with pytest.raises(BadInput, match="missing gradient shard"):
        read_gradient_shard(tmp_path / "part-9.parquet")
    with pytest.raises(BadInput, match="missing gradient shard"):
        read_shard_meta(tmp_path / "part-9.parquet")


def test_metadata_k_must_match_column_width(tmp_path: Path) -> None:
    path = tmp_path / "part-0.parquet"
    write_gradient_shard(path, np.arange(4), torch.randn(4, 6), _meta(6))
    table = pq.read_table(path)
    bad = json.dumps({**json.loads(table.schema.metadata[b"sieve"]), "k": 5}).encode()
    pq.write_table(table.replace_schema_metadata({b"sieve": bad}), path)
    with pytest.raises(BadInput, match="k=5 but grad is 24 bytes wide"):
        read_gradient_shard(path)
    with pytest.raises(BadInput, match="k=5"):
        read_shard_meta(path)


@pytest.mark.parametrize(
    "table, reason",
    [
        (pa.table({"sample_id": [1], "grad": [[1.0, 2.0]]}), "grad is list"),
        (pa.table({"sample_id": [1.0], "grad": pa.array([b"\0" * 8], pa.binary(8))}), "double"),
        (pa.table({"id": [1], "grad": pa.array([b"\0" * 8], pa.binary(8))}), "columns"),
        (pa.table({"sample_id": [1], "grad": pa.array([b"\0" * 8], pa.binary(8))}), "metadata"),
    ],
)
def test_wrong_schema_raises_bad_input(tmp_path: Path, table: pa.Table, reason: str) -> None:
    path = tmp_path / "part-0.parquet"
    meta = json.dumps({**_meta(2).__dict__}).encode()
    if reason != "metadata":
        table = table.replace_schema_metadata({b"sieve": meta})
    pq.write_table(table, path)
    with pytest.raises(BadInput, match=reason):
        read_gradient_shard(path)


def test_incomplete_metadata_raises_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "part-0.parquet"
    table = pa.table({"sample_id": [1], "grad": pa.array([b"\0" * 8], pa.binary(8))})
    pq.write_table(table.replace_schema_metadata({b"sieve": b'{"k": 2}'}), path)
    with pytest.raises(BadInput, match="bad sieve metadata"):
        read_shard_meta(path)
    pq.write_table(table.replace_schema_metadata({b"sieve": b"not json"}), path)
    with pytest.raises(BadInput, match="bad sieve metadata"):
        read_shard_meta(path)


def test_failed_write_leaves_no_files(tmp_path: Path, monkeypatch) -> None:
    def explode(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", explode)
    with pytest.raises(OSError, match="disk full"):
        write_gradient_shard(shard_path(tmp_path, 0), np.arange(2), torch.ones(2, 2), _meta(2))
    assert list(tmp_path.iterdir()) == []


def test_complete_shards_sorted_numerically_and_skip_temp_files(tmp_path: Path) -> None:
    assert complete_shards(tmp_path / "missing") == []
    for part in (10, 2, 1):
        write_gradient_shard(shard_path(tmp_path, part), np.arange(1), torch.ones(1, 1), _meta(1))
    (tmp_path / ".part-3.parquet.tmp-123-abcd").write_bytes(b"half")
    (tmp_path / "part-x.parquet").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert complete_shards(tmp_path) == [shard_path(tmp_path, p) for p in (1, 2, 10)]


def test_meta_fields_survive_round_trip(tmp_path: Path) -> None:
    meta = replace(_meta(3), projection=None, seed=None, split="val", checkpoint=0)
    write_gradient_shard(tmp_path / "part-0.parquet", np.arange(1), torch.ones(1, 3), meta)
    assert read_shard_meta(tmp_path / "part-0.parquet") == meta
