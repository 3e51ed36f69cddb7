"""Seeded random projection of flat gradients, generated tile by tile (spec section 10).

``x = P^T g / sqrt(k)`` with ``P`` (d x k) of i.i.d. Rademacher (+-1) or standard Gaussian
entries, so ``E[x_1 . x_2] = g_1 . g_2`` and the inner-product error is about
``||g_1|| ||g_2|| / sqrt(k)``. ``P`` is never materialized: the flat parameter vector is split
into tiles (each parameter tensor, cut into row ranges of at most ``max_rows``), each tile's rows
of ``P`` are generated on the CPU on the fly, moved to the gradients' device and accumulated.

Reproducibility and sharding. The rows of parameter ``p`` are grouped into fixed seed chunks of
``SEED_ROWS`` rows; chunk ``c`` is drawn from a CPU ``torch.Generator`` seeded with
``numpy.random.SeedSequence([seed, model_id, p, c])`` (row-major, one stream per chunk), so any
worker regenerates any part of ``P``. A tile is a run of consecutive rows inside one seed chunk,
drawn in sequence from that chunk's stream (CPU ``rand``/``randint`` draws are serial, so the
values do not depend on how the chunk is cut into tiles): ``max_rows`` bounds memory only and
changes the result by float rounding at most. The per-row arithmetic never depends on the other
rows of a call: rows are multiplied in zero-padded blocks of exactly ``block_rows`` rows (the
BLAS kernel, hence the summation order, is then the same for every block), in float64, with the
tiles accumulated in a fixed order; the output is bit-identical however the samples are
sharded, for a given device and BLAS.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

ProjectionKind = Literal["rademacher", "gaussian"]
KINDS: tuple[str, ...] = ("rademacher", "gaussian")
SEED_ROWS = 2**16
"""Rows of P drawn from one seeded stream (the seed chunk); part of the projection's identity."""


@dataclass(frozen=True)
class Projector:
    """Random projection ``(m, d) -> (m, k)``, ``x = P^T g / sqrt(k)``, P never materialized.

    ``parameter_sizes``: (name, numel) of every projected parameter in the model's parameter
    order (``named_parameters()`` filtered by ``requires_grad``); d is their sum. ``model_id``
    separates the projections of ensemble members. ``max_rows``: most rows of P generated at once
    (memory bound). ``block_rows``: rows of g multiplied together (fixed, see the module
    docstring). ``cache_bytes``: when the whole of P (float64, d * k * 8 bytes) fits, its tiles
    are kept between calls per device (small models); otherwise every call regenerates them.

    Cost per call: d * k random draws (on the CPU) + O(ceil(m / block_rows) * block_rows * d * k)
    float64 multiply-adds. Memory: the (m, k) float64 accumulator plus one tile of
    ``min(max_rows, SEED_ROWS) x k`` and a ``block_rows x tile`` slice of g, both float64.
    """

    k: int
    seed: int
    kind: ProjectionKind = "rademacher"
    parameter_sizes: tuple[tuple[str, int], ...] = field(kw_only=True)
    model_id: int = 0
    max_rows: int = 2**16
    block_rows: int = 64
    cache_bytes: int = 2**28
    _cache: dict[str, list[tuple[int, torch.Tensor]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        sizes = tuple((str(name), int(numel)) for name, numel in self.parameter_sizes)
        object.__setattr__(self, "parameter_sizes", sizes)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}; expected one of {KINDS}")
        if self.seed < 0 or self.model_id < 0:
            raise ValueError("seed and model_id must be >= 0 (they seed numpy.random.SeedSequence)")
        if self.max_rows < 1 or self.block_rows < 1:
            raise ValueError("max_rows and block_rows must be >= 1")
        if not sizes or any(numel < 1 for _, numel in sizes):
            raise ValueError("parameter_sizes must list at least one parameter, each numel >= 1")

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
            "max_rows": self.max_rows,
            "seed_rows": SEED_ROWS,
            "parameter_order": [name for name, _ in self.parameter_sizes],
            "parameter_sizes": [[name, numel] for name, numel in self.parameter_sizes],
            "scale": "1/sqrt(k)",
            "seeding": "numpy.random.SeedSequence([seed, model_id, param_index, seed_chunk]) "
            "-> CPU torch.Generator, rows of P in order",
        }

    def project(self, grads: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Project flat gradient rows (m, d) to (m, k), on ``grads``' device.

        The result is computed in float64 and returned as ``dtype`` (float32 by default). Row i
        of the output depends only on row i of ``grads`` (bit for bit), so any sharding of the
        samples gives the same rows.
        """
        if grads.ndim != 2 or grads.shape[1] != self.dim:
            raise ValueError(
                f"expected gradients of shape (m, d={self.dim}), got {tuple(grads.shape)}"
            )
        m, device, block = grads.shape[0], grads.device, self.block_rows
        out = torch.zeros(m, self.k, dtype=torch.float64, device=device)
        if m == 0:
            return out.to(dtype)
        padded = torch.zeros(block, 0, dtype=torch.float64, device=device)
        for start, tile in self._tiles(device):
            stop = start + tile.shape[0]
            if padded.shape[1] != tile.shape[0]:
                padded = torch.zeros(block, tile.shape[0], dtype=torch.float64, device=device)
            for row in range(0, m, block):
                rows = grads[row : row + block, start:stop]
                padded[: rows.shape[0]] = rows
                padded[rows.shape[0] :] = 0
                out[row : row + block] += (padded @ tile)[: rows.shape[0]]
        return (out / math.sqrt(self.k)).to(dtype)

    def matrix(self) -> torch.Tensor:
        """P itself (d, k), float64, for tests and tiny models only (it is d x k)."""
        return torch.cat([tile for _, tile in self._tiles(torch.device("cpu"))])

    def _tiles(self, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
        """(first flat row, rows of P (r, k) float64 on ``device``) in the fixed tile order."""
        cached = self._cache.get(str(device))
        if cached is not None:
            yield from cached
            return
        keep = self.dim * self.k * 8 <= self.cache_bytes
        tiles: list[tuple[int, torch.Tensor]] = []
        offset, step = 0, min(self.max_rows, SEED_ROWS)
        for param_index, (_, numel) in enumerate(self.parameter_sizes):
            for chunk_index, chunk_start in enumerate(range(0, numel, SEED_ROWS)):
                chunk_rows = min(SEED_ROWS, numel - chunk_start)
                generator = torch.Generator(device="cpu")
                generator.manual_seed(self._chunk_seed(param_index, chunk_index))
                for piece in range(0, chunk_rows, step):
                    rows = min(step, chunk_rows - piece)
                    tile = self._draw(generator, rows).to(device)
                    if keep:
                        tiles.append((offset, tile))
                    yield offset, tile
                    offset += rows
        if keep:
            with self._lock:
                self._cache[str(device)] = tiles

    def _chunk_seed(self, param_index: int, chunk_index: int) -> int:
        entropy = [self.seed, self.model_id, param_index, chunk_index]
        state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
        return int(state) & (2**63 - 1)

    def _draw(self, generator: torch.Generator, rows: int) -> torch.Tensor:
        """The next ``rows`` rows of P from a seed chunk's stream: (rows, k) float64."""
        if self.kind == "rademacher":
            signs = torch.randint(0, 2, (rows, self.k), generator=generator, dtype=torch.float32)
            return signs.to(torch.float64).mul_(2).sub_(1)
        # Box-Muller within each row (serial uniform draws keep rows independent of tiling);
        # float32 entries, as the spec's generator produces, held in float64
        half = (self.k + 1) // 2
        uniform = torch.rand(rows, 2 * half, generator=generator, dtype=torch.float64)
        radius = torch.sqrt(-2.0 * torch.log1p(-uniform[:, :half]))
        angle = (2.0 * math.pi) * uniform[:, half:]
        normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
        return normal[:, : self.k].to(torch.float32).to(torch.float64)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_lock", threading.Lock())
