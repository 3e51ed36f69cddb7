"""Section 3: gradient shard read throughput, ``storage.gradient_shards.read_gradient_shard``
(``fixed_size_binary(4k)`` raw float32) and the streaming reader ``iter_gradient_blocks`` (with
and without its sha256 check; blocks consumed as they come, nothing kept) vs pyarrow reading
the same gradients stored as a ``fixed_size_list<float32>`` column. Same rows, both
uncompressed, no dictionary, the same row-group size; files are read warm (from the page
cache): one warm-up read each, then ``repeats`` timed reads round-robin, median.
GB/s counts the gradient payload (m * k * 4 bytes), 1 GB = 1e9 bytes.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks._measure import measure_interleaved, one_line, release_memory
from storage.gradient_shards import (
    ROW_GROUP_SIZE,
    ShardMeta,
    iter_gradient_blocks,
    read_gradient_shard,
    write_gradient_shard,
)

SIEVE = "Sieve read_gradient_shard (binary → (m, k) tensor)"


def _write_list(path: Path, ids: np.ndarray, grads: torch.Tensor) -> None:
    m, k = grads.shape
    values = pa.array(grads.numpy().reshape(-1), type=pa.float32())
    table = pa.table({"sample_id": pa.array(ids, pa.int64()),
                      "grad": pa.FixedSizeListArray.from_arrays(values, k)})
    pq.write_table(table, path, compression="none", use_dictionary=False,
                   row_group_size=ROW_GROUP_SIZE)


def _list_to_tensor(path: Path) -> torch.Tensor:
    table = pq.read_table(path)
    column = table.column("grad").combine_chunks()
    k = column.type.list_size
    with warnings.catch_warnings():  # a read-only buffer, wrapped without a copy
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(column.flatten().to_numpy().reshape(-1, k))


def _stream(path: Path, verify: bool) -> int:
    """Stream every block of the shard (each a view, dropped at once); the rows seen."""
    return sum(len(ids) for ids, _ in iter_gradient_blocks(path, verify=verify))


def run_section(quick: bool, repeats: int = 3) -> dict:
    m, k = (2048, 1024) if quick else (8192, 4810)
    grads = torch.randn(m, k, generator=torch.Generator().manual_seed(0))
    ids = np.arange(m, dtype=np.int64)
    payload = m * k * 4
    rows = []
    with tempfile.TemporaryDirectory(prefix="sieve-bench-shards-") as tmp:
        binary, listed = Path(tmp) / "part-0.parquet", Path(tmp) / "list.parquet"
        meta = ShardMeta(dtype="float32", projection=None, k=k, seed=None,
                         parameter_order=["w"], parameter_count=k, checkpoint=0,
                         model_hash="bench", split="train")
        write_gradient_shard(binary, ids, grads, meta)
        _write_list(listed, ids, grads)
        methods: list[tuple[str, str, Callable[[], object], bool]] = [
            (SIEVE, binary.name, lambda: read_gradient_shard(binary)[1], True),
            ("Sieve iter_gradient_blocks, checksum verified (streamed blocks)", binary.name,
             lambda: _stream(binary, verify=True), False),
            ("Sieve iter_gradient_blocks, checksum not verified (streamed blocks)", binary.name,
             lambda: _stream(binary, verify=False), False),
            ("pyarrow read_table + to (m, k) tensor, fixed_size_list<float32>", listed.name,
             lambda: _list_to_tensor(listed), True),
            ("pyarrow read_table only (Arrow table), fixed_size_list<float32>", listed.name,
             lambda: pq.read_table(listed), False),
            ("pyarrow read_table only (Arrow table), Sieve's binary file", binary.name,
             lambda: pq.read_table(binary, memory_map=True), False),
        ]
        sizes = {binary.name: binary.stat().st_size, listed.name: listed.stat().st_size}
        ready = {}
        for name, file, fn, to_tensor in methods:
            row = {"method": name, "file_mib": sizes[file] / 2**20}
            rows.append(row)
            out = None
            try:
                out = fn()  # the warm-up read
                if to_tensor:
                    row["exact"] = bool(torch.equal(out, grads))
                ready[name] = fn
            except Exception as exc:  # noqa: BLE001
                row["failed"] = one_line(exc)
            del out
            release_memory()
        timed = measure_interleaved(ready, repeats)
        for row in rows:
            result = timed.get(row["method"])
            if isinstance(result, BaseException):
                row["failed"] = one_line(result)
            elif result is not None:
                row |= {"seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
                        "cpu_per_wall": result.cpu_per_wall,
                        "gb_per_s": payload / result.median / 1e9,
                        "peak_delta_mib": result.peak_delta_mib}
    sieve = rows[0].get("gb_per_s")
    for row in rows:
        if sieve and row.get("gb_per_s"):
            row["ratio_sieve"] = row["gb_per_s"] / sieve
    return {"info": {"rows": m, "k": k, "payload_mib": payload / 2**20, "repeats": repeats,
                     "row_group_size": ROW_GROUP_SIZE}, "rows": rows}
