"""Seeded dense random projection of flat gradients, P generated on the gradients' device.

``x = P^T g / sqrt(k)`` with ``P`` (d x k) of i.i.d. Rademacher (+-1) or standard Gaussian
entries, so ``E[x_1 . x_2] = g_1 . g_2`` and the inner-product error is about
``||g_1|| ||g_2|| / sqrt(k)``.

Generator. Entry (r, j) of parameter p's rows of P is a pure function of
``(seed, model_id, p, r, j)``: a counter-based integer hash (``counter_hash``, 32-bit
arithmetic held in int64 so it never overflows) keyed by ``SeedSequence([seed, model_id, p])``.
It runs as tensor ops wherever the gradients are (CPU or CUDA), needs no generator state, and
gives the same integers on every device: Rademacher entries are identical everywhere, Gaussian
entries (Box-Muller from two hashed uniforms, rounded to float32) agree to a few float32 ulps
across devices (their ``log``/``cos`` differ). Any worker regenerates any tile of P.

Arithmetic and reproducibility. P is cut into tiles (each parameter in row ranges of at most
``max_rows``); tiles are kept resident between calls (per device and precision, process-wide)
when the whole of P fits ``cache_bytes``, otherwise regenerated per call. The product runs in
``precision`` (float32 by default; "tf32" allows TF32 on CUDA, "bfloat16" multiplies bf16
operands with a float32 result, "float64" as before), accumulating the tiles in a fixed order
into a float32 (float64) result, with the rows of g multiplied in zero-padded blocks of exactly
``block_rows`` rows aligned to the rows' global index (``first_row``), so a row's arithmetic
never depends on the other rows of a call nor on where a shard starts (BLAS kernels pick their
path by shape and by a row's position in the block). Contract: on one device, precision and
dtype, the output is bit-identical however the samples are sharded (and whether or not P is
resident); across devices and precisions it agrees within the
precision's rounding (float32: relative error ~1e-6 of ``||g|| ||P||``; TF32/bfloat16: ~1e-3).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

ProjectionKind = Literal["rademacher", "gaussian"]
KINDS: tuple[str, ...] = ("rademacher", "gaussian")
Precision = Literal["float32", "tf32", "bfloat16", "float64"]
PRECISIONS: tuple[str, ...] = ("float32", "tf32", "bfloat16", "float64")
_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for int64 ``x`` holding uint32 values (no int64 overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (lowbias32), on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(*entropy: int) -> tuple[int, int]:
    """Two 32-bit keys of one stream of P (from ``numpy.random.SeedSequence(entropy)``)."""
    k0, k1 = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint32)
    return int(k0), int(k1)


def counter_hash(key: tuple[int, int], rows: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Hash of every (row, word) pair (broadcast), uint32 values in int64; rows < 2^32."""
    r = _mix32((rows & _MASK) ^ key[0])
    w = _mix32(((words * _GOLDEN) & _MASK) ^ key[1])
    return _mix32(r ^ w)


def draw_rows(key: tuple[int, int], start: int, stop: int, k: int, kind: str,
              device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of one stream of P: (stop - start, k), entries +-1 or N(0, 1)
    rounded to float32, returned as ``dtype`` on ``device``."""
    rows = torch.arange(start, stop, dtype=torch.int64, device=device)[:, None]
    if kind == "rademacher":
        words = torch.arange((k + 31) // 32, dtype=torch.int64, device=device)[None, :]
        h = counter_hash(key, rows, words)
        shifts = torch.arange(32, dtype=torch.int64, device=device)
        bits = (h[:, :, None] >> shifts) & 1
        signs = bits.reshape(rows.shape[0], -1)[:, :k].to(dtype)
        return signs.mul_(2).sub_(1)
    half = (k + 1) // 2
    pairs = torch.arange(half, dtype=torch.int64, device=device)[None, :]
    u1 = (counter_hash(key, rows, 2 * pairs).to(torch.float64) + 0.5) / 2.0**32
    u2 = (counter_hash(key, rows, 2 * pairs + 1).to(torch.float64) + 0.5) / 2.0**32
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :k]
    return normal.to(torch.float32).to(dtype)


def operand_dtype(precision: str) -> torch.dtype:
    """The dtype P and the gradient blocks are multiplied in."""
    return {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(precision, torch.float32)


def accumulate_dtype(precision: str) -> torch.dtype:
    return torch.float64 if precision == "float64" else torch.float32


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 on for the block when ``precision == "tf32"`` on CUDA, off otherwise (restored)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class ResidentTiles:
    """Process-wide store of generated P tiles, keyed by the projection's identity, device and
    precision; holds at most ``budget`` bytes (least recently used dropped first)."""

    def __init__(self) -> None:
        self._tiles: OrderedDict[tuple, list[tuple[int, torch.Tensor]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> list[tuple[int, torch.Tensor]] | None:
        with self._lock:
            tiles = self._tiles.get(key)
            if tiles is not None:
                self._tiles.move_to_end(key)
            return tiles

    def put(self, key: tuple, tiles: list[tuple[int, torch.Tensor]], budget: int) -> None:
        with self._lock:
            self._tiles[key] = tiles
            while sum(_bytes(t) for t in self._tiles.values()) > budget and len(self._tiles) > 1:
                self._tiles.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()


def _bytes(tiles: list[tuple[int, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in tiles)


RESIDENT = ResidentTiles()


@dataclass(frozen=True)
class Projector:
    """Dense random projection ``(m, d) -> (m, k)``, ``x = P^T g / sqrt(k)``.

    ``parameter_sizes``: (name, numel) of every projected parameter in the model's parameter
    order (``named_parameters()`` filtered by ``requires_grad``); d is their sum. ``model_id``
    separates the projections of ensemble members. ``max_rows``: most rows of P generated at once
    (memory bound). ``block_rows``: rows of g multiplied together (fixed, see the module
    docstring). ``cache_bytes``: P (d * k operand bytes) stays resident on its device when it
    fits this budget. ``precision``: see the module docstring.

    Cost per call: O(ceil(m / block_rows) * block_rows * d * k) multiply-adds, plus d * k hashed
    entries when P is not resident. Memory: the (m, k) accumulator, P when resident (else one
    ``max_rows x k`` tile) and a ``block_rows x tile`` slice of g.
    """

    k: int
    seed: int
    kind: ProjectionKind = "rademacher"
    parameter_sizes: tuple[tuple[str, int], ...] = field(kw_only=True)
    model_id: int = 0
    max_rows: int = 2**16
    block_rows: int = 256
    cache_bytes: int = 2**30
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        sizes = tuple((str(name), int(numel)) for name, numel in self.parameter_sizes)
        object.__setattr__(self, "parameter_sizes", sizes)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}; expected one of {KINDS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of "
                             f"{PRECISIONS}")
        if self.seed < 0 or self.model_id < 0:
            raise ValueError("seed and model_id must be >= 0 (they seed numpy.random.SeedSequence)")
        if self.max_rows < 1 or self.block_rows < 1:
            raise ValueError("max_rows and block_rows must be >= 1")
        if not sizes or any(not 1 <= numel < 2**32 for _, numel in sizes):
            raise ValueError("parameter_sizes must list at least one parameter, "
                             "each 1 <= numel < 2^32")

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        k: int,
        seed: int,
        kind: ProjectionKind = "rademacher",
        model_id: int = 0,
        **options: Any,
    ) -> Projector:
        """A projector over ``model``'s trainable parameters, in ``named_parameters()`` order."""
        sizes = tuple((n, p.numel()) for n, p in model.named_parameters() if p.requires_grad)
        return cls(k, seed, kind, parameter_sizes=sizes, model_id=model_id, **options)

    @property
    def dim(self) -> int:
        """d, the length of the flat gradients this projector accepts."""
        return sum(numel for _, numel in self.parameter_sizes)

    def metadata(self) -> dict[str, Any]:
        """Everything that determines P, to save next to projected gradients."""
        return {
            "kind": self.kind,
            "k": self.k,
            "seed": self.seed,
            "model_id": self.model_id,
            "precision": self.precision,
            "parameter_order": [name for name, _ in self.parameter_sizes],
            "parameter_sizes": [[name, numel] for name, numel in self.parameter_sizes],
            "scale": "1/sqrt(k)",
            "seeding": "counter_hash(SeedSequence([seed, model_id, param_index]), row, column) "
            "(estimators.projection, v2)",
        }

    def project(self, grads: torch.Tensor, dtype: torch.dtype = torch.float32,
                first_row: int = 0) -> torch.Tensor:
        """Project flat gradient rows (m, d) to (m, k), on ``grads``' device, as ``dtype``.

        Row i of the output depends only on row i of ``grads`` and on ``first_row + i`` (its
        global index: row i sits at position ``(first_row + i) % block_rows`` of its padded
        block), so any sharding of the samples that passes each shard's start as
        ``first_row`` gives the same rows, bit for bit.
        """
        if grads.ndim != 2 or grads.shape[1] != self.dim:
            raise ValueError(
                f"expected gradients of shape (m, d={self.dim}), got {tuple(grads.shape)}"
            )
        m, device, block = grads.shape[0], grads.device, self.block_rows
        operand, acc = operand_dtype(self.precision), accumulate_dtype(self.precision)
        out = torch.zeros(m, self.k, dtype=acc, device=device)
        if m == 0:
            return out.to(dtype)
        padded = torch.zeros(block, 0, dtype=operand, device=device)
        with matmul_precision(self.precision, device):
            for start, tile in self._tiles(device):
                stop = start + tile.shape[0]
                if padded.shape[1] != tile.shape[0]:
                    padded = torch.zeros(block, tile.shape[0], dtype=operand, device=device)
                for base in range(first_row - first_row % block, first_row + m, block):
                    lo = max(base, first_row) - first_row
                    hi = min(base + block, first_row + m) - first_row
                    at = lo + first_row - base
                    padded.zero_()
                    padded[at : at + hi - lo] = grads[lo:hi, start:stop]
                    out[lo:hi] += (padded @ tile)[at : at + hi - lo].to(acc)
        return (out / math.sqrt(self.k)).to(dtype)

    def matrix(self) -> torch.Tensor:
        """P itself (d, k), float64, for tests and tiny models only (it is d x k)."""
        tiles = [tile for _, tile in self._fresh_tiles(torch.device("cpu"), torch.float64)]
        return torch.cat(tiles)

    def _identity(self) -> tuple:
        return (self.k, self.seed, self.kind, self.parameter_sizes, self.model_id, self.max_rows)

    def _tiles(self, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
        """(first flat row, rows of P (r, k) in the operand dtype) in the fixed tile order."""
        operand = operand_dtype(self.precision)
        key = (self._identity(), str(device), operand)
        resident = RESIDENT.get(key)
        if resident is not None:
            yield from resident
            return
        if self.dim * self.k * torch.finfo(operand).bits // 8 > self.cache_bytes:
            yield from self._fresh_tiles(device, operand)
            return
        tiles = list(self._fresh_tiles(device, operand))
        RESIDENT.put(key, tiles, self.cache_bytes)
        yield from tiles

    def _fresh_tiles(self, device: torch.device,
                     dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        offset = 0
        for index, (_, numel) in enumerate(self.parameter_sizes):
            key = stream_key(self.seed, self.model_id, index)
            for start in range(0, numel, self.max_rows):
                stop = min(numel, start + self.max_rows)
                yield offset + start, draw_rows(key, start, stop, self.k, self.kind, device,
                                                dtype)
            offset += numel
