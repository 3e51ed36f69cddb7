"""if_arnoldi against the exact damped solve, by Krylov dimension, on a run's stored model.

    python -m benchmarks.arnoldi_convergence --store STORE --run RUN_ID [--dims 100,200,300,400]

For each Krylov dimension k (``if_arnoldi`` with ``n_iter=k``) and for the adaptive default,
on the run's final model 0, its training rows and its train x test targets
(``targets.test_samples``): the mean over targets of the Spearman correlation of if_arnoldi's
per-target scores with the exact damped solve's (``if_cg`` at rtol 1e-10: the same damping, the
same curvature), and the relative residual ``||(C + s I) x - b|| / ||b||`` of its approximate
inverse for the summed validation gradient b and for the adaptive rule's random-sign sums of
training gradients (the worst of them). The residual is what the default stops on
(docs/estimators.md, if_arnoldi); this shows whether it tracks the agreement. Seconds: one
``pairwise`` call, one thread, eigenspace not cached.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from estimators._streaming import gradient_source
from estimators.iterative_influence import ArnoldiInfluence, ConjugateGradientInfluence
from estimators.per_sample import parameter_count
from storage.checkpoints import read_checkpoint_index
from storage.store import Store
from tasks.config import load_resolved_config
from tasks.score import scoring_context


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.arnoldi_convergence",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--run", required=True, help="a run id of the store (a finished sieve run)")
    p.add_argument("--dims", default="100,200,300,400", help="comma list of Krylov dimensions")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = Store(args.store).existing_run(args.run)
    config = load_resolved_config(run.config)
    records = [r for r in read_checkpoint_index(run.checkpoints_dir) if r.model == 0]
    targets = scoring_context(run, config, records, pairwise=True)
    summed = scoring_context(run, config, records)

    reference = ConjugateGradientInfluence(rtol=1e-10, maxiter=5000)
    _, _, exact = reference.pairwise(targets)
    d = parameter_count(summed.model_at(summed.final))
    g_v = gradient_source(summed, reference.needs).target(summed.final.index)
    g_v = g_v.to(torch.float64).unsqueeze(1)
    probes = ArnoldiInfluence().stop_probes(summed)
    print(f"run {args.run}: d = {d}, {exact.shape[1]} targets, damping "
          f"{reference.damping_used:.3e} + weight decay {summed.weight_decay:.1e}")
    print(f"{'Krylov dimension':>18} {'Spearman w/ exact':>18} {'residual g_V':>13} "
          f"{'residual probes':>16} {'seconds':>8}")
    dims: list[int | None] = [int(k) for k in args.dims.split(",") if k.strip()] + [None]
    for k in dims:
        estimator = ArnoldiInfluence(n_iter=k)
        started = time.perf_counter()
        _, _, scores = estimator.pairwise(targets)
        seconds = time.perf_counter() - started
        agreement = np.mean([spearmanr(scores[:, j], exact[:, j])[0]
                             for j in range(exact.shape[1])])
        label = str(k) if k is not None else f"default ({estimator.krylov_dimension})"
        print(f"{label:>18} {agreement:>18.4f} "
              f"{estimator.relative_residual(summed, g_v):>13.4f} "
              f"{estimator.relative_residual(summed, probes):>16.4f} {seconds:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
