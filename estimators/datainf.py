"""DataInf: a closed-form, layer-wise approximation of the damped inverse curvature (spec §4).

Source: Kwon et al., "DataInf", arXiv 2310.00902; https://github.com/ykwon0407/DataInf
(``src/influence.py``). Built for LoRA-like layers with few parameters each; the approximation
error grows with the layer size d_l.

Layers: the trainable parameters grouped by the module that owns them (weight + bias of one
Linear/Conv = one layer; a LayerNorm's weight + bias = one layer; parameters registered directly
on the root module form the layer ""). With per-sample gradients g_il (layer block, d_l values) of
the n training rows and the empirical Fisher ``G_l = (1/n) sum_i g_il g_il^T``:

- ``lambda_l = lambda_scale * mean_i(||g_il||^2 / d_l) + weight_decay`` (DataInf's damping, plus
  the project rule that weight decay enters the curvature as ``+ wd * I``);
- ``(G_l + lambda_l I)^{-1} v_l ~= h_l = (1/(n lambda_l)) sum_i [v_l - ((v_l . g_il) /
  (lambda_l + ||g_il||^2)) g_il]`` (the inverse of the mean of rank-one matrices replaced by the
  mean of their Sherman-Morrison inverses);
- ``score(k) = + sum_l h_l . g_kl``. The DataInf code returns ``-sum_l h_l . g_kl`` (Koh-Liang
  sign, positive = harmful); we negate, so positive = beneficial.

v is the *summed* target gradient g_V (``GradientSource.target``), as for every other project
estimator, not DataInf's mean validation gradient: this scales all scores by the number of target
rows and changes no ranking.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from estimators._streaming import gradient_source, linear_pairwise, stream
from estimators.base import (
    Attribution,
    Estimator,
    GradientSource,
    Needs,
    PairwiseVectors,
    ScoringContext,
)


def parameter_layers(model: nn.Module) -> list[tuple[str, slice]]:
    """DataInf layers: (owning module name, column slice of the flat gradient), in
    ``parameter_order(model)``; consecutive trainable parameters of one module form a layer."""
    layers: list[tuple[str, slice]] = []
    offset = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rpartition(".")[0]
        size = p.numel()
        if layers and layers[-1][0] == owner and layers[-1][1].stop == offset:
            layers[-1] = (owner, slice(layers[-1][1].start, offset + size))
        else:
            layers.append((owner, slice(offset, offset + size)))
        offset += size
    return layers


class DataInf(Estimator):
    """DataInf influence (positive = beneficial), streamed over the stored full gradients.

    ``score(k) = sum_l h_l . g_kl`` with h_l the DataInf approximation of ``(G_l + lambda_l I)^{-1}
    g_V,l`` (module docstring); roughly ``n * [U(theta_without_k) - U(theta)]`` for the summed
    target loss U, up to the approximation. ``suspicion(k) = sum_l g_kl^T (G_l + lambda_l
    I)^{-1} g_kl`` with the same Sherman-Morrison-sum approximation, i.e. ``sum_l (1/(n lambda_l))
    [n ||g_kl||^2 - g_kl^T M_l g_kl]``, ``M_l = sum_i g_il g_il^T / (lambda_l + ||g_il||^2)``
    (always > 0); it needs M_l (d_l, d_l), so it is None when a layer has more than
    ``suspicion_max_dim`` parameters. Outputs (n,), float64, in the gradient source's shard order.

    Cost: three streaming passes over the train gradients (layer norms -> lambda_l; the
    Sherman-Morrison sums -> h; scores), O(n d) time per target (plus O(n sum_l d_l^2) for the
    suspicion), memory O(d) per target plus ``sum_l d_l^2`` for the suspicion. Needs full
    (unprojected) gradients: layer boundaries are parameter boundaries.
    """

    name = "datainf"
    needs = Needs(checkpoints="final", gradients=True, full_gradients=True, model=True)

    def __init__(self, lambda_scale: float = 0.1, suspicion_max_dim: int = 4096) -> None:
        if lambda_scale <= 0:
            raise ValueError(f"lambda_scale must be > 0, got {lambda_scale}")
        if suspicion_max_dim < 0:
            raise ValueError(f"suspicion_max_dim must be >= 0, got {suspicion_max_dim}")
        self.lambda_scale = lambda_scale
        self.suspicion_max_dim = suspicion_max_dim

    def _layers(self, ctx: ScoringContext, d: int) -> list[tuple[str, slice]]:
        layers = parameter_layers(ctx.model_factory())
        total = layers[-1][1].stop if layers else 0
        if total != d:
            raise ValueError(
                f"datainf needs full (unprojected) gradients: the model has {total} trainable "
                f"parameters, the stored gradients have {d} columns"
            )
        return layers

    def _inverse_targets(
        self,
        source: GradientSource,
        checkpoint: int,
        layers: list[tuple[str, slice]],
        targets: torch.Tensor,
        weight_decay: float,
        with_suspicion: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None, int]:
        """Passes 1-2. Returns (h (m, d), lambda (L,), M_l list or None, n), float64."""
        sq = torch.zeros(len(layers), dtype=torch.float64)
        n = 0
        for _, grads in source.train_shards(checkpoint):
            g = grads.to(torch.float64)
            sq += torch.stack([(g[:, cols] ** 2).sum() for _, cols in layers]).cpu()
            n += g.shape[0]
        if n == 0:
            raise ValueError(f"no train gradient rows at checkpoint {checkpoint}")
        sizes = torch.tensor([cols.stop - cols.start for _, cols in layers], dtype=torch.float64)
        lam = self.lambda_scale * sq / (n * sizes) + weight_decay
        if not bool((lam > 0).all()):
            empty = [name for (name, _), v in zip(layers, lam, strict=True) if v <= 0]
            raise ValueError(f"datainf: layers {empty} have all-zero gradients and no weight decay")

        weighted = torch.zeros_like(targets)  # sum_i c_il g_il, per target
        moments = (
            [torch.zeros(c.stop - c.start, c.stop - c.start, dtype=torch.float64,
                         device=targets.device) for _, c in layers]
            if with_suspicion else None
        )
        for _, grads in source.train_shards(checkpoint):
            g = grads.to(device=targets.device, dtype=torch.float64)
            for k, (_, cols) in enumerate(layers):
                gl = g[:, cols]
                denom = lam[k].item() + (gl * gl).sum(dim=1, keepdim=True)  # (B, 1)
                coef = (gl @ targets[:, cols].T) / denom  # (B, m)
                weighted[:, cols] += coef.T @ gl
                if moments is not None:
                    moments[k] += (gl / denom).T @ gl
        h = torch.empty_like(targets)
        for k, (_, cols) in enumerate(layers):
            h[:, cols] = (n * targets[:, cols] - weighted[:, cols]) / (n * lam[k].item())
        return h, lam, moments, n

    def score(self, ctx: ScoringContext) -> Attribution:
        source = gradient_source(ctx, self.needs)
        ckpt = ctx.final.index
        g_v = source.target(ckpt).to(torch.float64)
        layers = self._layers(ctx, g_v.shape[0])
        with_suspicion = self.suspicion_max_dim >= max(c.stop - c.start for _, c in layers)
        h, lam, moments, n = self._inverse_targets(
            source, ckpt, layers, g_v.unsqueeze(0), ctx.weight_decay, with_suspicion
        )
        h = h[0]

        def per_shard(g: torch.Tensor) -> tuple[torch.Tensor, ...]:
            g = g.to(h.device)
            if moments is None:
                return (g @ h,)
            self_inf = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
            for k, (_, cols) in enumerate(layers):
                gl = g[:, cols]
                quad = ((gl @ moments[k]) * gl).sum(dim=1)
                self_inf += (n * (gl * gl).sum(dim=1) - quad) / (n * lam[k].item())
            return g @ h, self_inf

        ids, columns = stream(source, ckpt, per_shard)
        return Attribution(
            sample_ids=ids, score=columns[0], suspicion=columns[1] if moments is not None else None
        )

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores against single target rows (``GradientSource.target_rows``): (train ids (n,),
        target ids (m,), (n, m) float64), same sign; h is linear in v, so the columns sum to
        ``score`` when the target rows sum to the summed target gradient."""
        return linear_pairwise(self, ctx)

    def pairwise_vectors(self, ctx: ScoringContext) -> PairwiseVectors:
        """``{final: h_t}``: each target row's DataInf vector (two passes over the train
        shards, memory O(m d)); the scores ``g_z . h_t`` are linear in the train gradients."""
        source = gradient_source(ctx, self.needs)
        ckpt = ctx.final.index
        target_ids, rows = source.target_rows(ckpt)
        rows = rows.to(torch.float64)
        layers = self._layers(ctx, rows.shape[1])
        h, _, _, _ = self._inverse_targets(source, ckpt, layers, rows, ctx.weight_decay, False)
        return PairwiseVectors(np.asarray(target_ids, dtype=np.int64), {ckpt: h})
