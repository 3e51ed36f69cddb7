"""Diff-In (Tan et al.) and the SGD-unrolled first + second order sum: second-order influence
accumulated over training checkpoints (spec section 6).

Source: Tan et al., "Understanding Data Influence with Differential Approximation",
arXiv 2508.14648; the authors' code https://github.com/hrtan/Diff-In (``diff_in/estimator.py``,
"paper Eq. (9)"). The formula follows the released code.

Per checkpoint t of ``ctx.checkpoints`` (m of them, N training samples)::

    a_t       = - t * eta_t^2 / (N * m)        t = Checkpoint.step,
                                               eta_t = Checkpoint.step_lr (else Checkpoint.lr)
    I(z, V)   = sum_t a_t * [ <H_B G_V, G_z> + <G_V, H_z G_B> ]          (paper Eq. (9))
    S(z, V)   = I(z, V) + sum_t (eta_t / (N * m)) * <G_V, G_z>          (SGD unrolled)

G_z = grad l(z; theta_t) (cross-entropy, no weight-decay term), G_V = grad U(V; theta_t) of
``ctx.target`` (default: the summed target loss), G_B the mean loss gradient over random training
batches B_t, H_B the Hessian of the mean batch loss (+ ``ctx.weight_decay * I`` when
``weight_decay_in_curvature``), H_z the Hessian of l(z).

Signs (a project decision, docs/estimators.md): ``diffin`` reads Eq. (9)'s I(z, V) in Koh and
Liang's convention, the effect of including (up-weighting) z on V's loss, negative when z
helps; its score is ``-I(z, V)`` and its suspicion ``-I(z, z)``. This is the only reading
under which the paper's data-cleaning results can hold: read the other way it anti-correlated
with leave-one-out in every regime measured. ``unrolled_sgd`` is a different estimator: the
first + second order terms of unrolling SGD in 1/N, where removing z shifts the parameters by
``Delta_{t+1} = Delta_t + (eta_t/N) G_z - eta_t H_B Delta_t``; S approximates
``U(theta_without_z) - U(theta)`` (positive = beneficial), so its score is ``+S`` and its
suspicion ``+S(z, z)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from estimators.base import Attribution, Checkpoint, Estimator, Needs, ScoringContext
from estimators.hvp import finite_difference_hvp, flat_gradient, flat_loss
from estimators.hvp import hvp as autograd_hvp
from estimators.ip_ensemble import target_row_gradients
from estimators.per_sample import flat_parameters, parameter_order
from workloads.inputs import Inputs, call_functional, cast_floating, num_rows, take, unsqueeze_rows

HvpKind = Literal["finite_difference", "autograd"]
HVP_KINDS: tuple[str, ...] = ("finite_difference", "autograd")

SampleLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_loss(model: nn.Module) -> SampleLoss:
    """``(flat (d,), x_i, y_i) -> cross_entropy(model(x_i), y_i)``: one sample's loss as a
    function of the flat trainable parameters (``parameter_order``); buffers are kept. For
    ``torch.func.vmap`` over samples and ``grad``/``jvp`` over the parameters."""
    names = parameter_order(model)
    named = dict(model.named_parameters())
    shapes = [named[name].shape for name in names]
    sizes = [named[name].numel() for name in names]
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss(flat: torch.Tensor, xi: Inputs, yi: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, sizes)
        params = {name: t.view(s) for name, t, s in zip(names, pieces, shapes, strict=True)}
        out = call_functional(model, (params, buffers), unsqueeze_rows(xi))
        return F.cross_entropy(out, yi.unsqueeze(0))

    return loss


@dataclass
class _Step:
    """What one checkpoint contributes: the float64 model at theta_t, its flat parameters (d,),
    the proxy batch (b rows), G_B (d,), the second-order coefficient a_t and the first-order
    weight (0 for diffin)."""

    model: nn.Module
    theta: torch.Tensor
    batch_x: Inputs
    batch_y: torch.Tensor
    g_b: torch.Tensor
    a: float
    first: float


class _CheckpointSecondOrder(Estimator):
    """The shared computation of ``diffin`` and ``unrolled_sgd``: ``sign * sum`` over the
    checkpoints of the module docstring's I (diffin) or S (unrolled_sgd).

    Computation per checkpoint (all in float64, the model copied to float64, eval mode):

    * ``u_t = (H_B + lam I) G_V``: ONE Hessian-vector product on the proxy batch, dotted with every
      G_z (H_B symmetric: ``<G_V, H_B G_z> = <u_t, G_z>``). ``hvp="finite_difference"`` uses
      ``(grad L_B(theta + e v/||v||) - grad L_B(theta)) ||v|| / e`` (central difference with
      ``central=True``) on the same batch, ``hvp="autograd"`` the exact product.
    * ``<G_V, H_z G_B>`` for all z at once from per-sample gradients at two points:
      ``<G_V, grad l(z; theta + e Ĝ_B) - grad l(z; theta)> ||G_B|| / e`` with Ĝ_B = G_B/||G_B||
      (``hvp="autograd"``: exact per-sample ``H_z G_B`` by vmapped forward-over-reverse).
    * the proxy batch: ``batches_per_checkpoint`` batches of ``min(ctx.batch_size, N)`` distinct
      training rows each, drawn from ``numpy.random.default_rng(SeedSequence([ctx.seed,
      checkpoint.index]))`` and concatenated (equal sizes, so the mean loss over the union is the
      mean of the batch means, as the authors average per-batch brackets).

    The suspicion is ``sign`` times the same sum with G_z as the target (paper Eq. (12), the
    authors' self_influence): ``sum_t a_t [G_z^T (H_B + lam I) G_z + <G_z, H_z G_B>]`` (+ the
    first-order ``(eta_t/(N m)) ||G_z||^2`` for unrolled_sgd). ``G_z^T H_B G_z`` is the second
    difference of the batch loss along G_z, ``||G_z||^2 (L_B(theta + e u) - 2 L_B(theta) +
    L_B(theta - e u)) / e^2`` with u = G_z/||G_z|| (2 batch forwards per z, vectorized over z;
    exact with ``hvp="autograd"``). ``self_influence=False`` skips it (None).

    Options: ``central`` uses central instead of forward differences (the authors' scheme) in
    both finite-difference products (one more gradient pass, error O(e^2) instead of O(e));
    ``weight_decay_in_curvature`` adds ``ctx.weight_decay * I`` to H_B, as SGD with weight decay
    unrolls (the authors' code omits it; on the toy it changes Spearman by < 0.05).

    Shapes: score and suspicion (n,), float64, aligned with ``ctx.train_ids``. Units: target loss,
    up to the global factor T (total steps) the checkpoint subsampling drops (spec section 6:
    weight 1/m vs T/m).

    Cost per checkpoint: 2 (3 if ``central``) per-sample-gradient passes over the n training rows,
    3-4 gradients of the proxy batch and one target gradient; the suspicion adds 2 |B|-row
    forwards per z. Memory O(chunk_size * d). No per-sample HVP loop.
    """

    needs = Needs(checkpoints="all", model=True)
    first_order: bool = False  # add the SGD first-order term eta_t/(N m) <G_V, G_z>
    sign: float = 1.0  # the project score is sign * the sum

    def __init__(
        self,
        batches_per_checkpoint: int = 1,
        eps: float = 1e-3,
        hvp: HvpKind = "finite_difference",
        central: bool = False,
        weight_decay_in_curvature: bool = True,
        self_influence: bool = True,
        chunk_size: int = 256,
    ) -> None:
        if hvp not in HVP_KINDS:
            raise ValueError(f"unknown hvp {hvp!r}; expected one of {HVP_KINDS}")
        if batches_per_checkpoint < 1:
            raise ValueError(f"batches_per_checkpoint must be >= 1, got {batches_per_checkpoint}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.batches_per_checkpoint = batches_per_checkpoint
        self.eps = eps
        self.hvp = hvp
        self.central = central
        self.weight_decay_in_curvature = weight_decay_in_curvature
        self.self_influence = self_influence
        self.chunk_size = chunk_size

    # ----------------------------------------------------------------------------- public API

    def score(self, ctx: ScoringContext) -> Attribution:
        n = num_rows(ctx.train_x)
        score = np.zeros(n)
        suspicion = np.zeros(n) if self.self_influence else None
        for step in self._steps(ctx):
            tx, ty = _as64(ctx.target_x), ctx.target_y
            g_v = ctx.target.gradient(step.model, tx, ty).to(step.theta)
            u = self._batch_curvature(step, g_v.unsqueeze(1), ctx).squeeze(1)
            for rows, g_z, d_z in self._train_chunks(ctx, step):
                value = step.a * (g_z @ u + d_z @ g_v) + step.first * (g_z @ g_v)
                score[rows] += value.cpu().numpy()
                if suspicion is not None:
                    quad = self._quadratic(step, g_z, ctx)
                    own = step.a * (quad + (d_z * g_z).sum(1)) + step.first * (g_z * g_z).sum(1)
                    suspicion[rows] += own.cpu().numpy()
        ids = np.asarray(ctx.train_ids, dtype=np.int64)
        return Attribution(sample_ids=ids, score=self.sign * score,
                           suspicion=None if suspicion is None else self.sign * suspicion)

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The score of every train row z for every single target row v_j: (train ids (n,),
        target ids (m_t,), (n, m_t) float64), signed as ``score``; columns sum to it.

        Per checkpoint this needs ``U_t = (H_B + lam I) G_t^T`` for the m_t per-row target
        gradients: m_t batch HVPs (m_t + 1 batch gradients with finite differences), so the cost
        grows with checkpoints x targets; fine for small m_t. The per-sample passes over the
        train rows are shared by all targets. With finite differences the columns sum to
        ``score`` only up to the difference error (the products are not exactly linear in v)."""
        n, m_t = num_rows(ctx.train_x), num_rows(ctx.target_x)
        matrix = np.zeros((n, m_t))
        for step in self._steps(ctx):
            rows_t = target_row_gradients(
                step.model, ctx.target, _as64(ctx.target_x), ctx.target_y, self.chunk_size
            ).to(step.theta)
            u = self._batch_curvature(step, rows_t.T, ctx)  # (d, m_t)
            for rows, g_z, d_z in self._train_chunks(ctx, step):
                value = step.a * (g_z @ u + d_z @ rows_t.T) + step.first * (g_z @ rows_t.T)
                matrix[rows] += value.cpu().numpy()
        target_ids = ctx.target_ids if ctx.target_ids is not None else np.arange(m_t)
        return (
            np.asarray(ctx.train_ids, dtype=np.int64),
            np.asarray(target_ids, dtype=np.int64),
            self.sign * matrix,
        )

    # ------------------------------------------------------------------------------- helpers

    def _steps(self, ctx: ScoringContext) -> Iterator[_Step]:
        if not ctx.checkpoints:
            raise ValueError(f"{self.name} needs at least one checkpoint")
        n = num_rows(ctx.train_x)
        m = len(ctx.checkpoints)
        for ckpt in ctx.checkpoints:
            eta = _step_lr(ckpt)
            model = ctx.model_at(ckpt).to(torch.float64).eval()
            theta = flat_parameters(model)
            batch = self._batch_indices(ctx, ckpt)
            bx, by = _as64(take(ctx.train_x, batch)), ctx.train_y[batch]
            g_b = flat_gradient(model, bx, by, theta)
            yield _Step(
                model=model,
                theta=theta,
                batch_x=bx,
                batch_y=by,
                g_b=g_b,
                a=-ckpt.step * eta**2 / (n * m),
                first=eta / (n * m) if self.first_order else 0.0,
            )

    def _batch_indices(self, ctx: ScoringContext, ckpt: Checkpoint) -> torch.Tensor:
        n = num_rows(ctx.train_x)
        size = min(max(int(ctx.batch_size), 1), n)
        rng = np.random.default_rng(np.random.SeedSequence([ctx.seed, ckpt.index]))
        chosen = [
            rng.choice(n, size=size, replace=False) for _ in range(self.batches_per_checkpoint)
        ]
        return torch.as_tensor(np.concatenate(chosen), dtype=torch.long, device=ctx.train_y.device)

    def _batch_curvature(self, step: _Step, v: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        """``(H_B + lam I) v`` for the columns of v (d, k): (d, k), one HVP per column."""
        lam = ctx.weight_decay if self.weight_decay_in_curvature else 0.0
        columns = []
        for col in v.T:
            if self.hvp == "autograd":
                product = autograd_hvp(step.model, step.batch_x, step.batch_y, col)
            else:
                product = finite_difference_hvp(
                    step.model, step.batch_x, step.batch_y, col, eps=self.eps, central=self.central
                )
            columns.append(product + lam * col)
        return torch.stack(columns, dim=1)

    def _train_chunks(
        self, ctx: ScoringContext, step: _Step
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Yield (row slice, G_z (c, d), D_z ≈ H_z G_B (c, d)) over the training rows."""
        loss = sample_loss(step.model)
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
        g_b = step.g_b
        norm_b = float(torch.linalg.vector_norm(g_b))
        direction = g_b / norm_b if norm_b > 0 else g_b

        def hz_gb(xi: Inputs, yi: torch.Tensor) -> torch.Tensor:
            return jvp(lambda p: grad(loss)(p, xi, yi), (step.theta,), (g_b,))[1]

        x_all = _as64(ctx.train_x)
        for start in range(0, num_rows(x_all), self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            x, y = take(x_all, rows), ctx.train_y[rows]
            g_z = per_sample(step.theta, x, y)
            if norm_b == 0:
                d_z = torch.zeros_like(g_z)
            elif self.hvp == "autograd":
                with _quiet_forward_ad():
                    d_z = vmap(hz_gb)(x, y)
            else:
                plus = per_sample(step.theta + self.eps * direction, x, y)
                if self.central:
                    minus = per_sample(step.theta - self.eps * direction, x, y)
                    d_z = (plus - minus) * (norm_b / (2 * self.eps))
                else:
                    d_z = (plus - g_z) * (norm_b / self.eps)
            yield rows, g_z, d_z

    def _quadratic(self, step: _Step, g_z: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        """``G_z^T (H_B + lam I) G_z`` for every row of g_z (c, d): (c,)."""
        lam = ctx.weight_decay if self.weight_decay_in_curvature else 0.0
        sq = (g_z * g_z).sum(dim=1)
        batch_loss = flat_loss(step.model, step.batch_x, step.batch_y)
        if self.hvp == "autograd":

            def quad(g: torch.Tensor) -> torch.Tensor:
                return g @ jvp(grad(batch_loss), (step.theta,), (g,))[1]

            with _quiet_forward_ad():
                curv = vmap(quad)(g_z)
        else:
            norm = sq.sqrt()
            unit = g_z / torch.where(norm > 0, norm, torch.ones_like(norm)).unsqueeze(1)
            shift = self.eps * unit
            base = batch_loss(step.theta)
            plus = vmap(batch_loss)(step.theta + shift)
            minus = vmap(batch_loss)(step.theta - shift)
            curv = sq * (plus - 2 * base + minus) / self.eps**2
        return curv + lam * sq


class DiffIn(_CheckpointSecondOrder):
    """Diff-In, paper Eq. (9) as released (second-order terms only), read in Koh and Liang's
    convention (I = the effect of up-weighting z on V's loss): ``score = -I(z, V)``,
    ``suspicion = -I(z, z)``. Options and computation: ``_CheckpointSecondOrder``; figures
    against leave-one-out in docs/estimators.md."""

    name = "diffin"
    first_order = False
    sign = -1.0


class UnrolledSGD(_CheckpointSecondOrder):
    """SGD unrolled to first + second order in 1/N (not Diff-In): ``score = +S(z, V)``, the
    predicted ``U(theta_without_z) - U(theta)``; ``suspicion = +S(z, z)``. Its first-order
    part is TracIn / (N m). Valid while ``t * eta_t * lambda_max(H) << 1`` (short training).
    Options and computation: ``_CheckpointSecondOrder``."""

    name = "unrolled_sgd"
    first_order = True
    sign = 1.0


@contextmanager
def _quiet_forward_ad() -> Iterator[None]:
    """torch's forward-mode AD loads TorchScript decompositions on first use and warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script`", DeprecationWarning)
        yield


def _step_lr(ckpt: Checkpoint) -> float:
    return float(ckpt.step_lr if ckpt.step_lr is not None else ckpt.lr)


def _as64(x: Inputs) -> Inputs:
    return cast_floating(x, torch.float64)
