"""``python -m benchmarks.gpu_check``: the gradient and scoring code on a GPU (needs CUDA).

Checks and times, on ``cuda`` against the same code on the CPU: per-sample gradients (layerwise
and vmap routes agree; samples/s at a memory-budgeted chunk), the seeded projection (GPU rows
match CPU rows), and streaming scoring of gradient blocks against T targets (FLOP/s against
the GPU's measured float32 matmul rate). Needs only torch, numpy and pyarrow (no Prefect).
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from estimators.blockwise import stream_scores
from estimators.per_sample import layerwise_supported, per_sample_gradients
from estimators.projection import Projector
from workloads.models import mlp, small_cnn


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int = 5) -> float:
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def gradients(device: str = "cuda", n: int = 65_536) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, factory, features in (("mlp 64-256-10", lambda: mlp(64, 10, 256), 64),
                                    ("small_cnn (1,8,8)", lambda: small_cnn((1, 8, 8), 10), 64)):
        torch.manual_seed(0)
        cpu_model = factory().eval()
        x, y = torch.randn(n, features, generator=gen), torch.randint(0, 10, (n,), generator=gen)
        model = factory().eval().to(device)
        model.load_state_dict(cpu_model.state_dict())
        xc, yc = x.to(device), y.to(device)
        fast = per_sample_gradients(model, xc[:4096], yc[:4096], chunk_size=4096)
        vmapped = per_sample_gradients(model, xc[:4096], yc[:4096], 4096, cost=F.cross_entropy)
        on_cpu = per_sample_gradients(cpu_model, x[:4096], y[:4096])
        scale = vmapped.abs().max().item()
        row = {"model": name, "layerwise": layerwise_supported(model),
               "max_rel_diff_vs_vmap": (fast - vmapped).abs().max().item() / scale,
               "max_rel_diff_vs_cpu": (fast.cpu() - on_cpu).abs().max().item() / scale}
        for chunk in (1024, 8192):
            seconds = _timed(partial(per_sample_gradients, model, xc, yc, chunk_size=chunk))
            row[f"layerwise_samples_per_s_chunk{chunk}"] = n / seconds
        seconds = _timed(partial(per_sample_gradients, model, xc, yc, 8192, F.cross_entropy))
        row["vmap_samples_per_s_chunk8192"] = n / seconds
        projector = Projector.for_model(model, 1024, seed=0)
        projected = projector.project(fast[:512])
        row["projection_max_rel_diff_gpu_vs_cpu"] = (
            (projected.cpu() - projector.project(fast[:512].cpu())).abs().max().item()
            / projected.abs().max().item())
        rows.append(row)
    return rows


def scoring(device: str = "cuda", n: int = 1_000_000, k: int = 1024, targets: int = 1000,
            block: int = 65_536) -> dict:
    """n x k float32 rows in pinned host blocks, copied to the GPU and scored block by block."""
    gen = torch.Generator().manual_seed(1)
    host = torch.randn(block, k, generator=gen)
    host = host.pin_memory() if device == "cuda" else host
    target_rows = torch.randn(targets, k, generator=gen).to(device)
    a = torch.randn(8192, k, device=device)
    rate = 2 * 8192 * k * targets / _timed(lambda: a @ target_rows.T)

    def blocks():
        for start in range(0, n, block):
            m = min(block, n - start)
            yield np.arange(start, start + m), host[:m].to(device, non_blocking=True)

    _sync()
    started = time.perf_counter()
    count = len(stream_scores(blocks(), target_rows).sample_ids)
    seconds = time.perf_counter() - started
    return {"rows": count, "k": k, "targets": targets, "seconds": seconds,
            "tflop_per_s": 2 * count * k * targets / seconds / 1e12,
            "matmul_tflop_per_s": rate / 1e12, "host_to_device_included": True,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32, to compare with the CPU
    torch.backends.cudnn.allow_tf32 = False
    out = {"torch": torch.__version__, "gradients": gradients(), "scoring": scoring()}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
