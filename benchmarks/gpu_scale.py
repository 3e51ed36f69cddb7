"""``python -m benchmarks.gpu_scale [--device cuda|cpu] [--small] [--json PATH]``

The gradient path at scale (issue 14) with Sieve's own ``estimators`` code, needing only torch,
numpy and pyarrow (no Prefect: it runs on a bare GPU machine from a copy of the tree). A
CIFAR-shaped synthetic workload (50,000 train x 2,000 queries, 3x32x32, seeded random pixels
and labels, seeded weights) on a plain 9-layer CNN (Conv2d/ReLU/MaxPool ``nn.Sequential``,
~4.06M parameters) and a ResNet-9 (BatchNorm in eval mode, its affine parameters frozen: the
factorized projection covers Linear/Conv2d layers). Per model it reports samples/s per stage
against the forward + backward floor, peak device memory per stage, and end-to-end seconds for
the 2,000 x 50,000 pairwise scores by TRAK-style projected inner products (factorized features
of both sides, ``estimators.blockwise.stream_scores``) and by an influence function in the
projected space (``estimators.trak.TRAK(kind="factorized")``: the kernel solve
``phi_t^T (Phi^T Phi + lambda I)^-1 phi_z``); ``--with-ekfac`` adds EK-FAC pairwise with
targets in memory-budgeted chunks. ``--small`` shrinks widths and sizes for a CPU smoke run
(the test suite runs ``--device cpu --small``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from estimators.base import Checkpoint, ScoringContext
from estimators.blockwise import stream_scores
from estimators.factorized import FactorizedProjector
from estimators.kfac import EKFACInfluence
from estimators.per_sample import parameter_count, per_sample_gradients
from estimators.projection import Projector
from estimators.trak import TRAK


def cnn9(width: int = 64, hidden: int = 844, classes: int = 10) -> nn.Sequential:
    """7 Conv2d + 2 Linear (3x32x32 input; width 64: 4,063,374 parameters)."""
    w = width

    def conv(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU()]

    return nn.Sequential(
        *conv(3, w), *conv(w, w), nn.MaxPool2d(2),
        *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
        *conv(2 * w, 4 * w), *conv(4 * w, 4 * w), nn.MaxPool2d(2),
        *conv(4 * w, 8 * w), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * w * 4, hidden), nn.ReLU(), nn.Linear(hidden, classes),
    )


class _Residual(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def resnet9(width: int = 64, classes: int = 10) -> nn.Sequential:
    """The ResNet-9 of kronfluence's CIFAR-10 example (Conv-BN-ReLU, BatchNorm affine frozen)."""
    w = width

    def cbr(i: int, o: int, pool: bool = False) -> nn.Sequential:
        layers = [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
        return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

    model = nn.Sequential(
        cbr(3, w), cbr(w, 2 * w, pool=True),
        _Residual(nn.Sequential(cbr(2 * w, 2 * w), cbr(2 * w, 2 * w))),
        cbr(2 * w, 4 * w, pool=True), cbr(4 * w, 8 * w, pool=True),
        _Residual(nn.Sequential(cbr(8 * w, 8 * w), cbr(8 * w, 8 * w))),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, classes, bias=False),
    )
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(False)
    return model


class Clock:
    """Wall seconds and peak device memory of a block (CUDA: max allocated; CPU: process
    peak RSS, which never goes down)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def run(self, fn: Callable[[], Any]) -> tuple[Any, float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return out, time.perf_counter() - started, peak


def workload(n: int, m: int, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n + m,), generator=gen)
    return x[:n].to(device), y[:n].to(device), x[n:].to(device), y[n:].to(device)


def floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
    """A plain batched forward + backward over the rows: what every method pays."""
    for start in range(0, len(y), batch):
        loss = F.cross_entropy(model(x[start : start + batch]), y[start : start + batch])
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def measure_model(name: str, model: nn.Module, args: argparse.Namespace,
                  device: torch.device) -> dict[str, Any]:
    model = model.to(device).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y, qx, qy = workload(args.train, args.queries, 0, device)
    clock, rows, sub = Clock(device), [], min(args.stage_rows, args.train)
    out: dict[str, Any] = {"model": name, "parameters": parameter_count(model), "rows": rows}

    def stage(label: str, count: int, fn: Callable[[], Any]) -> Any:
        result, seconds, peak = clock.run(fn)
        rows.append({"stage": label, "samples": count, "seconds": seconds,
                     "samples_per_s": count / seconds if count else None, "peak_gib": peak})
        print(f"  {name:8s} {label:58s} {seconds:9.3f} s "
              f"{(count / seconds if count else 0):12,.0f} /s  peak {peak:7.2f} GiB",
              flush=True)
        return result

    floor(model, x[: args.batch], y[: args.batch], args.batch)  # warm-up
    stage(f"forward + backward floor (batch {args.batch})", sub,
          lambda: floor(model, x[:sub], y[:sub], args.batch))
    held = [stage("per_sample_gradients (n, d)", sub,
                  lambda: per_sample_gradients(model, x[:sub], y[:sub], chunk_size=args.batch))]
    dense = Projector.for_model(model, args.dense_k, seed=0, precision=args.precision,
                                cache_bytes=args.resident_gib * 2**30)
    stage(f"Projector(k={args.dense_k}).project, first call (P drawn)", sub,
          lambda: dense.project(held[0]))
    stage(f"Projector(k={args.dense_k}).project, P resident", sub,
          lambda: dense.project(held[0]))
    held.clear()
    factorized = FactorizedProjector.for_model(model, args.k_in, args.k_out, seed=0,
                                               block_rows=args.batch)
    out["factorized_k"] = factorized.k
    factorized.features(model, x[: args.batch], y[: args.batch])  # warm-up, P_in/P_out drawn
    stage(f"factorized features {args.k_in}x{args.k_out}/layer (k={factorized.k})", sub,
          lambda: factorized.features(model, x[:sub], y[:sub]))

    def ip_job() -> torch.Tensor:
        phi = factorized.features(model, x, y)
        targets = factorized.features(model, qx, qy)
        blocks = ((np.arange(s, min(s + 8192, len(y))), phi[s : s + 8192])
                  for s in range(0, len(y), 8192))
        return stream_scores(blocks, targets).summed

    stage(f"pairwise {args.queries} x {args.train}: projected IP (features + scores)",
          args.train + args.queries, ip_job)
    ctx = ScoringContext(
        model_factory=lambda: model, checkpoints=[Checkpoint(0, 0, 1.0, lambda: state)],
        train_ids=np.arange(args.train), train_x=x, train_y=y, target_x=qx, target_y=qy,
        device=device, batch_size=args.batch, target_ids=np.arange(args.queries))
    trak = TRAK(kind="factorized", k_in=args.k_in, k_out=args.k_out, chunk_size=args.batch)
    stage(f"pairwise {args.queries} x {args.train}: projected influence (TRAK factorized)",
          args.train + args.queries, lambda: trak.pairwise(ctx))
    if args.with_ekfac:
        ekfac = EKFACInfluence(target_memory_mb=args.target_memory_mb)
        stage(f"pairwise {args.queries} x {args.train}: EK-FAC, targets chunked",
              args.train + args.queries, lambda: ekfac.pairwise(ctx))
    floor_rate = rows[0]["samples_per_s"]
    for row in rows:
        if row["samples"] == sub and row["samples_per_s"]:
            row["share_of_floor"] = row["samples_per_s"] / floor_rate
    summary = ", ".join(f"{r['stage'].split(' (')[0]}: {r['share_of_floor']:.0%}"
                        for r in rows[1:] if "share_of_floor" in r)
    pairwise = ", ".join(f"{r['stage'].split(': ')[-1]}: {r['seconds']:.1f} s"
                         for r in rows if r["stage"].startswith("pairwise"))
    print(f"  {name}: share of the floor -- {summary}\n  {name}: end to end -- {pairwise}; "
          f"peak {max(r['peak_gib'] for r in rows):.2f} GiB", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny widths and sizes (CPU smoke)")
    parser.add_argument("--models", default="cnn9,resnet9")
    parser.add_argument("--precision", default="float32",
                        choices=("float32", "tf32", "bfloat16", "float64"))
    parser.add_argument("--with-ekfac", action="store_true")
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    full = {"train": 50_000, "queries": 2_000, "stage_rows": 2_048, "batch": 512, "width": 64,
            "k_in": 64, "k_out": 64, "dense_k": 1024, "resident_gib": 32,
            "target_memory_mb": 16_384}
    small = {"train": 48, "queries": 4, "stage_rows": 32, "batch": 16, "width": 4,
             "k_in": 8, "k_out": 8, "dense_k": 64, "resident_gib": 1, "target_memory_mb": 1}
    for key, value in (small if args.small else full).items():
        setattr(args, key, value)
    device = torch.device(args.device)
    if args.small:
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    makers = {"cnn9": lambda: cnn9(args.width, hidden=844 if not args.small else 32),
              "resnet9": lambda: resnet9(args.width)}
    print(f"gpu_scale on {device} ({'small' if args.small else 'full'}): {args.train} train x "
          f"{args.queries} queries, torch {torch.__version__}", flush=True)
    results = {"device": str(device), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "settings": {k: getattr(args, k) for k in (*full, "precision")}, "models": []}
    for name in args.models.split(","):
        torch.manual_seed(0)
        results["models"].append(measure_model(name, makers[name](), args, device))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
