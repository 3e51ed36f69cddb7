"""Section 1: per-sample gradient throughput, Sieve vs a naive autograd loop vs peer libraries.

Everyone gets the same data (digits rows), the same model and the same weights (a seeded
initialization saved once as a checkpoint file), one torch thread, batches of ``batch`` rows.
Each method is built untimed, run once untimed (warm-up, also used to check its gradients
against Sieve's), then timed ``repeats`` times over all rows; the median is reported.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._measure import measure_interleaved, one_line, release_memory
from estimators.factorized import FactorizedProjector
from estimators.per_sample import parameter_count, per_sample_gradients
from estimators.projection import Projector
from workloads.datasets import load_digits
from workloads.models import mlp, seeded_model, small_cnn

GRADS = "per-sample gradients (n, d)"
PROJECTED = "projected to k dims (n, k)"


@dataclass
class Setup:
    """One model under test: its factory, weights (also as a checkpoint file), data, sizes."""

    model: str
    factory: Callable[[], nn.Module]
    state: dict[str, torch.Tensor]
    checkpoint: Path
    x: torch.Tensor
    y: torch.Tensor
    batch: int
    k: int
    workdir: Path

    @property
    def d(self) -> int:
        return parameter_count(self.factory())

    def loaded(self) -> nn.Module:
        """A fresh model in eval mode holding the weights."""
        model = self.factory()
        model.load_state_dict(self.state)
        return model.eval()

    def batches(self):
        for start in range(0, len(self.y), self.batch):
            yield self.x[start : start + self.batch], self.y[start : start + self.batch]


@dataclass
class Method:
    """``build(setup)`` returns the timed callable (or raises: the row says failed)."""

    name: str
    group: str
    build: Callable[[Setup], Callable[[], torch.Tensor]]
    checked: bool = True
    """The callable returns CE-loss gradients in parameter order (compared with Sieve's)."""
    note: str = ""


@dataclass
class Row:
    model: str
    method: str
    group: str
    samples_per_s: float | None = None
    seconds: list[float] | None = None
    cpu_seconds: list[float] | None = None
    cpu_per_wall: float | None = None
    peak_delta_mib: float | None = None
    max_rel_diff: float | None = None
    ratio_sieve: float | None = None
    ratio_naive: float | None = None
    failed: str | None = None
    note: str = ""


# Sieve and the naive loop ------------------------------------------------------------------


def build_sieve(setup: Setup) -> Callable[[], torch.Tensor]:
    model = setup.loaded()
    return lambda: per_sample_gradients(model, setup.x, setup.y, chunk_size=setup.batch)


def build_sieve_projected(setup: Setup) -> Callable[[], torch.Tensor]:
    """What the gradient stage does with ``gradients.projection=k``: a fresh Projector per
    call (as per shard task); its P tiles are resident process-wide after the warm-up pass
    (as in a worker that runs several shards), like traker's BasicProjector's matrix."""
    model = setup.loaded()

    def run() -> torch.Tensor:
        projector = Projector.for_model(model, setup.k, seed=0)
        grads = per_sample_gradients(model, setup.x, setup.y, chunk_size=setup.batch)
        return projector.project(grads)

    return run


def factorized_sizes(k: int) -> tuple[int, int]:
    """(k_in, k_out) per layer with k_in * k_out = k (k_in the larger when k is not square)."""
    k_out = 2 ** (int(math.log2(k)) // 2)
    return k // k_out, k_out


def build_sieve_factorized(setup: Setup) -> Callable[[], torch.Tensor]:
    """``gradients.projection: {kind: factorized}``: LoGra features from hooks, k_in x k_out =
    k per layer (capped at the layer's sizes), no per-sample gradient formed."""
    model = setup.loaded()
    k_in, k_out = factorized_sizes(setup.k)

    def run() -> torch.Tensor:
        projector = FactorizedProjector.for_model(model, k_in, k_out, seed=0,
                                                  block_rows=setup.batch)
        return projector.features(model, setup.x, setup.y)

    return run


def build_naive(setup: Setup) -> Callable[[], torch.Tensor]:
    model = setup.loaded()
    params = [p for p in model.parameters() if p.requires_grad]
    d = sum(p.numel() for p in params)

    def run() -> torch.Tensor:
        out = torch.empty(len(setup.y), d)
        for i in range(len(setup.y)):
            loss = F.cross_entropy(model(setup.x[i : i + 1]), setup.y[i : i + 1])
            grads = torch.autograd.grad(loss, params)
            out[i] = torch.cat([g.reshape(-1) for g in grads])
        return out

    return run


SIEVE = "Sieve per_sample_gradients (layerwise closed form)"
NAIVE = "naive loop (autograd.grad per sample)"
SIEVE_PROJECTED = "Sieve per_sample_gradients + Projector (k)"
SIEVE_FACTORIZED = "Sieve FactorizedProjector.features (k_in x k_out per layer)"


def own_methods() -> list[Method]:
    return [
        Method(SIEVE, GRADS, build_sieve),
        Method(NAIVE, GRADS, build_naive),
        Method(SIEVE_PROJECTED, PROJECTED, build_sieve_projected, checked=False,
               note="dense rademacher, float32, P resident"),
        Method(SIEVE_FACTORIZED, PROJECTED, build_sieve_factorized, checked=False,
               note="factorized (LoGra), k_in x k_out = k per layer"),
    ]


# setup and running ---------------------------------------------------------------------------


def digits_xy(n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    samples = load_digits({"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    x, y = torch.from_numpy(samples.x), torch.from_numpy(samples.label)
    return (x, y) if n is None else (x[:n], y[:n])


def make_setups(n: int | None, batch: int, k: int, workdir: Path) -> list[Setup]:
    x, y = digits_xy(n)
    factories = {
        "mlp 64-64-10": lambda: mlp(64, 10, hidden=64),
        "small_cnn (1,8,8)": lambda: small_cnn((1, 8, 8), 10),
    }
    setups = []
    for i, (name, factory) in enumerate(factories.items()):
        state = {k_: v.clone() for k_, v in seeded_model(factory, 0).state_dict().items()}
        path = workdir / f"model{i}.pt"
        torch.save(state, path)
        setups.append(Setup(name, factory, state, path, x, y, batch, k, workdir))
    return setups


def prepare(setup: Setup, method: Method, reference: torch.Tensor | None,
            row: Row) -> tuple[Callable[[], torch.Tensor] | None, torch.Tensor | None]:
    """Build ``method`` and run its warm-up pass (checked against ``reference``); returns
    (the callable, the warm-up output), or (None, None) with ``row.failed`` set."""
    try:
        with warnings.catch_warnings():  # peers warn about inputs not requiring grad
            warnings.simplefilter("ignore", UserWarning)
            fn = method.build(setup)
            first = fn().detach()
            if method.checked and reference is not None:
                scale = reference.abs().max().clamp_min(1e-30)
                diff = (first.to(reference.dtype) - reference).abs().max()
                row.max_rel_diff = float(diff / scale)
    except Exception as exc:  # noqa: BLE001 - a peer failing is a result, not a crash
        row.failed = one_line(exc)
        return None, None
    return fn, first


def run_model(setup: Setup, methods: list[Method], repeats: int) -> list[Row]:
    """Build and warm up every method, then time them round-robin (``measure_interleaved``)."""
    rows = {m.name: Row(setup.model, m.name, m.group, note=m.note) for m in methods}
    ready: dict[str, Callable[[], torch.Tensor]] = {}
    reference = None
    for method in methods:
        fn, first = prepare(setup, method, reference, rows[method.name])
        if method.name == SIEVE and first is not None:
            reference = first
            rows[method.name].max_rel_diff = 0.0
        if fn is not None:
            ready[method.name] = fn
        del first
        release_memory()
    del reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        timed = measure_interleaved(ready, repeats)
    for name, result in timed.items():
        row = rows[name]
        if isinstance(result, BaseException):
            row.failed = one_line(result)
            continue
        row.seconds, row.cpu_seconds = result.seconds, result.cpu_seconds
        row.samples_per_s = len(setup.y) / result.median
        row.cpu_per_wall = result.cpu_per_wall
        row.peak_delta_mib = result.peak_delta_mib
    return list(rows.values())


def run_section(quick: bool, repeats: int = 3) -> dict:
    from benchmarks import peers

    torch.set_num_threads(1)
    n, batch, k = (256, 128, 256) if quick else (None, 256, 1024)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="sieve-bench-psg-") as tmp:
        setups = make_setups(n, batch, k, Path(tmp))
        for setup in setups:
            methods = (own_methods()[:2] + peers.methods() + own_methods()[2:]
                       + peers.projected_methods())
            model_rows = run_model(setup, methods, repeats) + peers.skipped_rows(setup.model)
            k_in, k_out = factorized_sizes(k)
            width = FactorizedProjector.for_model(setup.loaded(), k_in, k_out, seed=0).k
            for row in model_rows:
                if row.method == SIEVE_FACTORIZED:
                    row.note = f"factorized (LoGra), {k_in} x {k_out} per layer, total k={width}"
            _ratios(model_rows)
            rows += model_rows
        info = {
            "samples": len(setups[0].y), "batch": batch, "k": k, "repeats": repeats,
            "d": {s.model: s.d for s in setups},
            "weights": "seeded initialization (seed 0), saved once as the checkpoint file",
            "timing": "each method built and warmed up once, then timed passes round-robin",
        }
    return {"info": info, "rows": [r.__dict__ for r in rows]}


def _ratios(rows: list[Row]) -> None:
    by_name = {r.method: r for r in rows}
    naive = by_name.get(NAIVE)
    refs = {GRADS: by_name.get(SIEVE), PROJECTED: by_name.get(SIEVE_PROJECTED)}
    for row in rows:
        if row.samples_per_s is None:
            continue
        ref = refs.get(row.group)
        if ref is not None and ref.samples_per_s:
            row.ratio_sieve = row.samples_per_s / ref.samples_per_s
        if row.group == GRADS and naive is not None and naive.samples_per_s:
            row.ratio_naive = row.samples_per_s / naive.samples_per_s
