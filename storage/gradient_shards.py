"""Per-sample gradient shards: Parquet files of (sample_id, raw float32 gradient bytes).

Layout: ``sample_id int64`` and ``grad fixed_size_binary(4*k)`` holding little-endian float32
(``fixed_size_binary(2*k)`` holding float16 or bfloat16 when ``ShardMeta.dtype`` says so),
uncompressed, no dictionary, 1024-row row groups (fast to read; see STACK.md). The shard's
``ShardMeta`` is JSON in the schema metadata under ``b"sieve"``; its checksum under
``b"sieve.sha256"``: the hex sha256 of that JSON's bytes, then the ids (little-endian int64),
then the gradient bytes. Every full read verifies it, and so does the streaming reader (ids
first, then the gradient bytes block by block, one pass: the definition needs no format
version), so a damaged shard is never used.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storage.atomic import atomic_path, read_parquet_schema
from storage.errors import BadInput
from storage.location import StorePath, input_file, parquet_source, store_path

META_KEY = b"sieve"
CHECKSUM_KEY = b"sieve.sha256"
ROW_GROUP_SIZE = 1024
_PART = re.compile(r"^part-(\d+)\.parquet$")
_LE_F32 = np.dtype("<f4")
STORED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
"""Gradient storage precisions (``ShardMeta.dtype``); readers always return float32."""
_LE_I64 = np.dtype("<i8")


@dataclass
class ShardMeta:
    """What a shard holds; k is the gradient width (the parameter count when unprojected)."""

    dtype: str
    projection: str | None
    k: int
    seed: int | None
    parameter_order: list[str]
    parameter_count: int
    checkpoint: int
    model_hash: str
    split: str


def shard_path(directory: StorePath, part: int) -> StorePath:
    """``directory / part-<part>.parquet``."""
    return store_path(directory) / f"part-{part}.parquet"


def complete_shards(directory: StorePath) -> list[StorePath]:
    """The complete ``part-<n>.parquet`` files in ``directory`` (never temp files), by n.

    A missing directory has no shards.
    """
    directory = store_path(directory)
    if not directory.is_dir():
        return []
    parts = []
    for entry in directory.iterdir():
        m = _PART.match(entry.name)
        if m and entry.is_file():
            parts.append((int(m.group(1)), entry))
    return [p for _, p in sorted(parts)]


def write_gradient_shard(
    path: Path, sample_ids: np.ndarray, grads: torch.Tensor, meta: ShardMeta
) -> None:
    """Write one shard atomically.

    ``sample_ids``: (m,) integers; ``grads``: (m, k) with ``k == meta.k``, moved to the CPU and
    cast to ``meta.dtype`` (float32, or float16 / bfloat16 at half the bytes). The gradient
    column wraps the cast tensor's buffer without a copy.
    """
    ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
    if meta.dtype not in STORED_DTYPES:
        raise ValueError(f"unsupported shard dtype {meta.dtype!r}; one of {list(STORED_DTYPES)}")
    g = grads.detach().to(device="cpu", dtype=STORED_DTYPES[meta.dtype]).contiguous()
    if g.ndim != 2 or ids.ndim != 1 or g.shape[0] != ids.shape[0]:
        raise ValueError(f"need ids (m,) and grads (m, k), got {ids.shape} and {tuple(g.shape)}")
    m, k = g.shape
    if k != meta.k or k < 1:
        raise ValueError(f"grads have width {k}, meta says k={meta.k}")
    values = _raw(g)
    width = values.itemsize * k
    meta_json = json.dumps(asdict(meta)).encode()
    grad_col = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), m, [None, pa.py_buffer(values)]
    )
    schema = pa.schema(
        [
            pa.field("sample_id", pa.int64(), nullable=False),
            pa.field("grad", pa.binary(width), nullable=False),
        ],
        metadata={META_KEY: meta_json, CHECKSUM_KEY: _checksum(meta_json, ids, values).encode()},
    )
    table = pa.Table.from_arrays([pa.array(ids), grad_col], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            compression="none",
            use_dictionary=False,
            row_group_size=ROW_GROUP_SIZE,
            write_statistics=["sample_id"],
        )


def _raw(g: torch.Tensor) -> np.ndarray:
    """The stored little-endian values of a contiguous CPU tensor: float32 as ``<f4``, 16-bit
    floats as their ``<u2`` bit patterns (numpy has no bfloat16)."""
    if g.dtype == torch.float32:
        return g.numpy().astype(_LE_F32, copy=False)  # a no-op on little-endian machines
    return g.view(torch.int16).numpy().view(np.uint16).astype("<u2", copy=False)


def _checksum_head(meta_json: bytes, ids: np.ndarray) -> hashlib._Hash:
    """A sha256 fed the metadata JSON, then the ids as little-endian int64: the checksum's
    first part; the stored rows' bytes follow in row order (in one piece or block by block,
    the digest is the same)."""
    digest = hashlib.sha256(meta_json)
    digest.update(memoryview(np.ascontiguousarray(ids, dtype=_LE_I64)).cast("B"))
    return digest


def _checksum(meta_json: bytes, ids: np.ndarray, values: np.ndarray) -> str:
    """Hex sha256 of the metadata JSON, the ids as little-endian int64 and the stored rows'
    bytes (``_raw``: float32 ``<f4``, or 16-bit ``<u2`` patterns)."""
    digest = _checksum_head(meta_json, ids)
    if values.dtype.kind == "f":
        values = np.ascontiguousarray(values, dtype=_LE_F32)
    digest.update(memoryview(np.ascontiguousarray(values)).cast("B"))
    return digest.hexdigest()


def _stored_checksum(path: Path, schema: pa.Schema) -> bytes:
    """The hex checksum the shard was written with; BadInput when it has none."""
    stored = (schema.metadata or {}).get(CHECKSUM_KEY)
    if stored is None:
        raise _corrupted(path, "no checksum")
    return stored


_MISMATCH = "checksum mismatch (the file changed after it was written)"


def _corrupted(path: Path, reason: object) -> BadInput:
    first = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return BadInput(f"corrupted gradient shard {path}: {first}")


def _check_schema(path: Path, schema: pa.Schema) -> ShardMeta:
    """The shard's meta after checking the schema against it; BadInput when they disagree."""
    names = schema.names
    if names != ["sample_id", "grad"]:
        raise _corrupted(path, f"columns {names}, expected ['sample_id', 'grad']")
    if schema.field("sample_id").type != pa.int64():
        raise _corrupted(path, f"sample_id is {schema.field('sample_id').type}, expected int64")
    grad_type = schema.field("grad").type
    if not pa.types.is_fixed_size_binary(grad_type):
        raise _corrupted(path, f"grad is {grad_type}, expected fixed_size_binary")
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise _corrupted(path, "no sieve metadata")
    try:
        data = json.loads(raw)
        meta = ShardMeta(**{f.name: data[f.name] for f in fields(ShardMeta)})
    except (ValueError, TypeError, KeyError) as e:
        raise _corrupted(path, f"bad sieve metadata ({type(e).__name__}: {e})") from None
    if meta.dtype not in STORED_DTYPES:
        raise _corrupted(path, f"unsupported dtype {meta.dtype!r}")
    itemsize = STORED_DTYPES[meta.dtype].itemsize
    if not isinstance(meta.k, int) or meta.k * itemsize != grad_type.byte_width:
        raise _corrupted(path, f"metadata k={meta.k} but grad is {grad_type.byte_width} bytes "
                         f"wide ({meta.dtype}: {itemsize} bytes a value)")
    return meta


def read_shard_meta(path: Path) -> ShardMeta:
    """The shard's metadata (reads only the footer); BadInput when missing or corrupted."""
    path = store_path(path)
    try:
        schema = read_parquet_schema(path)
    except FileNotFoundError:
        raise BadInput(f"missing gradient shard {path}") from None
    except (OSError, pa.ArrowException) as e:
        raise _corrupted(path, e) from None
    return _check_schema(path, schema)


def read_gradient_shard(path: Path) -> tuple[np.ndarray, torch.Tensor]:
    """Ids (m,) int64 and gradients (m, k) float32 (CPU, contiguous) of one shard.

    Memory-maps the file (one handle, so a concurrent rewrite is never half seen) and copies
    each chunk's data buffer once into a preallocated tensor. BadInput when the file is missing,
    truncated, unreadable, disagrees with its metadata, or fails its checksum.
    """
    path = store_path(path)
    try:
        source = input_file(path, memory_map=True)
    except FileNotFoundError:
        raise BadInput(f"missing gradient shard {path}") from None
    except (OSError, pa.ArrowException) as e:
        raise _corrupted(path, e) from None
    with source:
        try:
            table = pq.read_table(source, use_threads=False)
        except (OSError, pa.ArrowException) as e:
            raise _corrupted(path, e) from None
        meta = _check_schema(path, table.schema)
        ids, raw = _to_numpy_and_tensor(path, table, meta.k, STORED_DTYPES[meta.dtype])
    stored = _stored_checksum(path, table.schema)
    if _checksum(table.schema.metadata[META_KEY], ids, _raw(raw)).encode() != stored:
        raise _corrupted(path, _MISMATCH)
    return ids, raw.to(torch.float32)


def _to_numpy_and_tensor(
    path: Path, table: pa.Table, k: int, dtype: torch.dtype = torch.float32
) -> tuple[np.ndarray, torch.Tensor]:
    """Ids and the stored rows as one (m, k) tensor of ``dtype`` (one copy of each chunk)."""
    id_col = table.column("sample_id")
    grad_col = table.column("grad")
    if id_col.null_count or grad_col.null_count:
        raise _corrupted(path, "null values")
    ids = np.ascontiguousarray(id_col.to_numpy(), dtype=np.int64)
    out = torch.empty((table.num_rows, k), dtype=dtype)
    wide = dtype == torch.float32
    dst = out.numpy() if wide else out.view(torch.int16).numpy().view(np.uint16)
    element = _LE_F32 if wide else np.dtype("<u2")
    width = element.itemsize * k
    row = 0
    for chunk in grad_col.chunks:
        n = len(chunk)
        if n:
            data = chunk.buffers()[1]
            src = np.frombuffer(data, dtype=element, count=n * k, offset=chunk.offset * width)
            dst[row : row + n] = src.reshape(n, k)
            row += n
    return ids, out


def iter_gradient_blocks(
    path: Path, row_groups: int = 8, verify: bool = True
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Stream one shard: (ids (m,) int64, gradients (m, k) float32) blocks, in row order.

    Reads the id column first (8 bytes a row), then ``row_groups`` row groups of gradients at
    a time (buffered reads, not a memory map, so resident memory holds only those; m <=
    row_groups * 1024) and yields, per Arrow chunk, without copying (16-bit shards: one float32
    copy per block), a tensor viewing Arrow's buffer: read-only, valid until the next block is
    yielded (clone it to keep it).

    ``verify``: hash the metadata and ids, then each block's stored bytes as it is read (the
    checksum ``read_gradient_shard`` checks, computed in one pass), and compare after the last
    block: a damaged shard raises the same BadInput (``corrupted gradient shard ...: checksum
    mismatch ...``) when the block after the last is asked for, so a consumer must commit what
    it computed from a shard only once the iterator is exhausted. A consumer that stops early
    has verified nothing.
    """
    path = store_path(path)
    try:
        shard = pq.ParquetFile(parquet_source(path), memory_map=False)
    except FileNotFoundError:
        raise BadInput(f"missing gradient shard {path}") from None
    except (OSError, pa.ArrowException) as e:
        raise _corrupted(path, e) from None
    with shard:
        schema = shard.schema_arrow
        meta = _check_schema(path, schema)
        k, dtype = meta.k, STORED_DTYPES[meta.dtype]
        element = _LE_F32 if dtype == torch.float32 else np.dtype("<i2")
        ids = _read_ids(path, shard)
        digest = _checksum_head(schema.metadata[META_KEY], ids) if verify else None
        stored = _stored_checksum(path, schema) if verify else b""
        row = 0
        for first in range(0, shard.num_row_groups, row_groups):
            groups = range(first, min(first + row_groups, shard.num_row_groups))
            try:
                column = shard.read_row_groups(groups, columns=["grad"], use_threads=False)
            except (OSError, pa.ArrowException) as e:
                raise _corrupted(path, e) from None
            for chunk in column.column("grad").chunks:
                n = len(chunk)
                if chunk.null_count or row + n > len(ids):
                    raise _corrupted(path, "null values or more gradient rows than ids")
                if n == 0:
                    continue
                values = np.frombuffer(chunk.buffers()[1], dtype=element, count=n * k,
                                       offset=chunk.offset * element.itemsize * k)
                if digest is not None:
                    digest.update(values)
                with warnings.catch_warnings():  # Arrow buffers are read-only; never written
                    warnings.simplefilter("ignore", UserWarning)
                    grads = torch.from_numpy(values.reshape(n, k))
                if dtype != torch.float32:  # 16-bit rows: one float32 copy per block
                    grads = grads.view(dtype).to(torch.float32)
                yield ids[row : row + n], grads
                row += n
        if row != len(ids):
            raise _corrupted(path, f"{row} gradient rows but {len(ids)} ids")
        if digest is not None and digest.hexdigest().encode() != stored:
            raise _corrupted(path, _MISMATCH)


def _read_ids(path: Path, shard: pq.ParquetFile) -> np.ndarray:
    """The shard's whole id column, (m,) int64; BadInput when unreadable or holding nulls."""
    try:
        column = shard.read(columns=["sample_id"], use_threads=False).column("sample_id")
    except (OSError, pa.ArrowException) as e:
        raise _corrupted(path, e) from None
    if column.null_count:
        raise _corrupted(path, "null values")
    return np.ascontiguousarray(column.to_numpy(), dtype=np.int64)
