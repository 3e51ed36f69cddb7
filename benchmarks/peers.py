"""Peer libraries' per-sample gradient paths, through their public APIs (optional extra
``peers``: ``pip install -e '.[peers]'``). A peer that is missing or fails gets a row saying why.

- captum: ``TracInCP.compute_intermediate_quantities`` (the per-example gradients, times the
  checkpoint's learning rate, here 1.0), with ``sample_wise_grads_per_batch=True`` (captum's
  hook-based batch trick, ``SampleGradientWrapper``, Linear and Conv2d only) and ``False``
  (captum's own per-example loop).
- dattri: ``AttributionTask.get_grad_loss_func`` (what its TracIn / influence attributors call):
  ``vmap(grad(loss))`` over a flattened parameter vector.
- traker: ``TRAKer``'s ``FunctionalGradientComputer.compute_per_sample_grad`` (vmap; gradients
  of TRAK's margin output, not the CE loss, so not compared with Sieve's numbers), and the full
  ``TRAKer.featurize`` path with a CPU ``BasicProjector`` (float32, one block of k columns).
- kronfluence: not a per-sample-gradient library (it fits EK-FAC factors and computes pairwise
  scores); no row is timed for it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.per_sample import GRADS, PROJECTED, Method, Row, Setup


def build_captum(per_batch: bool) -> Callable[[Setup], Callable[[], torch.Tensor]]:
    def build(setup: Setup) -> Callable[[], torch.Tensor]:
        from captum.influence import TracInCP
        from torch.utils.data import DataLoader, TensorDataset

        model = setup.loaded()

        def load(m: nn.Module, path: str) -> float:
            m.load_state_dict(torch.load(path, weights_only=True))
            m.eval()
            return 1.0  # the "learning rate" captum multiplies the gradients by

        loader = DataLoader(TensorDataset(setup.x, setup.y), batch_size=setup.batch)
        tracin = TracInCP(
            model, loader, checkpoints=[str(setup.checkpoint)], checkpoints_load_func=load,
            loss_fn=nn.CrossEntropyLoss(reduction="sum" if per_batch else "none"),
            batch_size=setup.batch, sample_wise_grads_per_batch=per_batch,
        )
        return lambda: tracin.compute_intermediate_quantities(loader)

    return build


def build_dattri(setup: Setup) -> Callable[[], torch.Tensor]:
    from dattri.task import AttributionTask

    model = setup.loaded()

    def loss(params, data):
        xi, yi = data
        out = torch.func.functional_call(model, params, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    task = AttributionTask(loss_func=loss, model=model, checkpoints=setup.state)
    grad_fn = task.get_grad_loss_func(in_dims=(None, 0))
    params, _ = task.get_param(ckpt_idx=0)
    return lambda: torch.cat([grad_fn(params, batch) for batch in setup.batches()])


def _traker(setup: Setup, tag: str):
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = setup.loaded()
    projector = BasicProjector(
        grad_dim=setup.d, proj_dim=setup.k, seed=0, proj_type=ProjectionType.rademacher,
        device=torch.device("cpu"), block_size=setup.k, dtype=torch.float32,
    )
    return TRAKer(
        model=model, task="image_classification", train_set_size=len(setup.y),
        save_dir=str(setup.workdir / f"trak-{tag}-{setup.checkpoint.stem}"),
        load_from_save_dir=False, device="cpu", projector=projector, proj_dim=setup.k,
        use_half_precision=False, logging_level=logging.ERROR,
    )


def build_trak_grads(setup: Setup) -> Callable[[], torch.Tensor]:
    from trak.utils import vectorize

    traker = _traker(setup, "grads")
    traker.load_checkpoint(setup.state, model_id=0)
    computer = traker.gradient_computer

    def run() -> torch.Tensor:
        return torch.cat([vectorize(computer.compute_per_sample_grad(batch=batch), device="cpu")
                          for batch in setup.batches()])

    return run


def build_trak_featurize(setup: Setup) -> Callable[[], torch.Tensor]:
    traker = _traker(setup, "featurize")
    model_ids = itertools.count()

    def run() -> torch.Tensor:
        # a new model id per pass: featurize skips samples already featurized for an id
        traker.load_checkpoint(setup.state, model_id=next(model_ids))
        for xb, yb in setup.batches():
            traker.featurize(batch=(xb, yb), num_samples=len(yb))
        return torch.from_numpy(traker.saver.current_store["grads"][:])

    return run


def methods() -> list[Method]:
    return [
        Method("captum TracInCP.compute_intermediate_quantities (per-batch hooks)", GRADS,
               build_captum(per_batch=True), note="sample_wise_grads_per_batch=True"),
        Method("captum TracInCP.compute_intermediate_quantities (per-example loop)", GRADS,
               build_captum(per_batch=False), note="sample_wise_grads_per_batch=False"),
        Method("dattri AttributionTask.get_grad_loss_func (vmap)", GRADS, build_dattri,
               note="flat parameter vector"),
        Method("traker FunctionalGradientComputer.compute_per_sample_grad (vmap)", GRADS,
               build_trak_grads, checked=False, note="margin output, not CE: not compared"),
    ]


def projected_methods() -> list[Method]:
    return [
        Method("traker TRAKer.load_checkpoint + featurize (BasicProjector k)", PROJECTED,
               build_trak_featurize, checked=False,
               note="rademacher fp32; + out-to-loss grads, memmap store"),
    ]


def skipped_rows(model: str) -> list[Row]:
    try:
        import kronfluence  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = (f"{type(exc).__name__}: {first} (dropped from the peers extra: needs "
                  "torchvision, a CUDA-linked wheel on PyPI; see benchmarks/README.md)")
    else:
        reason = "skipped: no public per-sample-gradient API (EK-FAC factors + pairwise scores)"
    return [Row(model, "kronfluence", GRADS, failed=reason)]
