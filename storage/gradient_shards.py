"""Per-sample gradient shards: Parquet files of (sample_id, raw float32 gradient bytes).

Layout: ``sample_id int64`` and ``grad fixed_size_binary(4*k)`` holding little-endian float32,
uncompressed, no dictionary, 1024-row row groups (fast to read; see STACK.md). The shard's
``ShardMeta`` is JSON in the schema metadata under ``b"sieve"``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storage.atomic import atomic_path, read_parquet_schema
from storage.errors import BadInput

META_KEY = b"sieve"
ROW_GROUP_SIZE = 1024
_PART = re.compile(r"^part-(\d+)\.parquet$")
_LE_F32 = np.dtype("<f4")


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


def shard_path(directory: Path, part: int) -> Path:
    """``directory / part-<part>.parquet``."""
    return Path(directory) / f"part-{part}.parquet"


def complete_shards(directory: Path) -> list[Path]:
    """The complete ``part-<n>.parquet`` files in ``directory`` (never temp files), by n.

    A missing directory has no shards.
    """
    directory = Path(directory)
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

    ``sample_ids``: (m,) integers; ``grads``: (m, k) float32 with ``k == meta.k`` (moved to CPU
    and made contiguous if needed; other dtypes are cast to float32). The gradient column wraps
    the tensor's buffer without a copy.
    """
    ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
    g = grads.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if g.ndim != 2 or ids.ndim != 1 or g.shape[0] != ids.shape[0]:
        raise ValueError(f"need ids (m,) and grads (m, k), got {ids.shape} and {tuple(g.shape)}")
    m, k = g.shape
    if k != meta.k or k < 1:
        raise ValueError(f"grads have width {k}, meta says k={meta.k}")
    if meta.dtype != "float32":
        raise ValueError(f"only float32 shards are supported, meta says {meta.dtype}")
    values = g.numpy().astype(_LE_F32, copy=False)  # a no-op on little-endian machines
    grad_col = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(4 * k), m, [None, pa.py_buffer(values)]
    )
    schema = pa.schema(
        [
            pa.field("sample_id", pa.int64(), nullable=False),
            pa.field("grad", pa.binary(4 * k), nullable=False),
        ],
        metadata={META_KEY: json.dumps(asdict(meta)).encode()},
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
    if not isinstance(meta.k, int) or meta.k * 4 != grad_type.byte_width:
        raise _corrupted(path, f"metadata k={meta.k} but grad is {grad_type.byte_width} bytes wide")
    if meta.dtype != "float32":
        raise _corrupted(path, f"unsupported dtype {meta.dtype!r}")
    return meta


def read_shard_meta(path: Path) -> ShardMeta:
    """The shard's metadata (reads only the footer); BadInput when missing or corrupted."""
    path = Path(path)
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
    truncated, unreadable or disagrees with its metadata.
    """
    path = Path(path)
    try:
        source = pa.memory_map(str(path))
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
        return _to_numpy_and_tensor(path, table, meta.k)


def _to_numpy_and_tensor(path: Path, table: pa.Table, k: int) -> tuple[np.ndarray, torch.Tensor]:
    id_col = table.column("sample_id")
    grad_col = table.column("grad")
    if id_col.null_count or grad_col.null_count:
        raise _corrupted(path, "null values")
    ids = np.ascontiguousarray(id_col.to_numpy(), dtype=np.int64)
    out = torch.empty((table.num_rows, k), dtype=torch.float32)
    dst = out.numpy()
    width = 4 * k
    row = 0
    for chunk in grad_col.chunks:
        n = len(chunk)
        if n:
            data = chunk.buffers()[1]
            src = np.frombuffer(data, dtype=_LE_F32, count=n * k, offset=chunk.offset * width)
            dst[row : row + n] = src.reshape(n, k)
            row += n
    return ids, out
