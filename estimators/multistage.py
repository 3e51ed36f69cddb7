"""Multi-stage influence: pretraining samples scored against a finetuned model's target loss.

Spec section 7 (Chen et al., NeurIPS 2020, arXiv 2007.09081, derived by the implicit function
theorem). Pretraining fits theta_pt = (W, Th) to ``G = mean_a g(a) + (wd_pt/2)||theta_pt||^2``;
finetuning fits the head U (and, in the proximal case, W) to ``F = mean_j f(x_j) +
(wd_ft/2)||U||^2 [+ (alpha/2)||W - W_pt||^2]``. The target is the summed cross-entropy f_T over
the target rows, evaluated at the finetuned model.

- frozen embedding: ``q = H_UU^{-1} grad_U f_T``, ``r_W = grad_W f_T - H_WU q``
  (H of F at the finetuned point), ``s = H_G^{-1} [r_W; 0_Th]``;
- proximal: ``p = alpha (H_F + alpha E)^{-1} grad_(W,U) f_T`` with E = diag(I_W, 0_U) and H_F
  the Hessian of F without the proximal term, ``s = H_G^{-1} [p_W; 0_Th]``;
- ``score(a) = s . grad g(a; theta_pt)`` (per-sample pretraining loss, no L2 term).

Removing a (weight -1/m) moves theta_pt by about ``+(1/m) H_G^{-1} g_a``, and the finetuned
target loss by ``(1/m) score(a)``; so ``score(a) ~ m * [f_T(without a) - f_T(full)]`` with m the
number of pretraining samples: positive = beneficial (the project sign). Chen et al. report
``d f_T / d eps`` for up-weighting, the negative of this. Plain torch; every curvature is the
exact Hessian (float64), solved densely (Cholesky) or by conjugate gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from estimators.hvp import _quiet_forward_ad
from estimators.influence import damped_cholesky
from estimators.iterative_influence import conjugate_gradient

Solver = Literal["exact", "cg"]
FlatFn = Callable[[torch.Tensor], torch.Tensor]


class FlatModule:
    """A module's trainable parameters as one float64 vector (``named_parameters()`` order)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.size = sum(self.sizes)

    def vector(self) -> torch.Tensor:
        params = [p.detach().reshape(-1).to(torch.float64) for p in self.module.parameters()]
        return torch.cat(params) if params else torch.zeros(0, dtype=torch.float64)

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's output on x with its parameters replaced by ``flat`` (size,)."""
        pieces = torch.split(flat, self.sizes) if self.sizes else ()
        params = {n: t.view(s) for n, t, s in zip(self.names, pieces, self.shapes, strict=True)}
        return functional_call(self.module, params, (x,))


@dataclass(frozen=True)
class Finetuning:
    """How the finetuned model was obtained (must match the actual finetuning).

    mode: 'frozen' (only U trained) or 'proximal' (W too, under (proximal/2)||W - W_pt||^2).
    weight_decay: wd_ft on U. damping: added to every curvature (0 at a strict optimum).
    """

    mode: Literal["frozen", "proximal"] = "frozen"
    proximal: float = 1.0
    weight_decay: float = 1e-3
    damping: float = 0.0


@dataclass(frozen=True)
class MultistageScores:
    """Per pretraining sample (m,), float64, aligned with the pretraining rows given:
    ``score`` (project sign, ~ m * change of the summed target loss when removed) and
    ``pretrain_loss`` (the baseline's input: the sample's own pretraining loss);
    ``solver_residual``: ||H_G s - rhs|| / ||rhs|| of the pretraining solve."""

    score: np.ndarray
    pretrain_loss: np.ndarray
    solver_residual: float


def hvp(fn: FlatFn, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hessian-vector product of scalar ``fn`` at ``theta`` (forward-over-reverse), (d,)."""
    return jvp(grad(fn), (theta,), (v,))[1]


def dense_hessian(fn: FlatFn, theta: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The exact Hessian (d, d) of scalar ``fn`` at ``theta``, ``block`` columns at a time."""
    d = theta.shape[0]
    eye = torch.eye(d, dtype=theta.dtype)
    columns = vmap(lambda v: hvp(fn, theta, v))
    h = torch.cat([columns(eye[s : s + block]) for s in range(0, d, block)])
    return (h + h.T) / 2


def solve_spd(
    fn: FlatFn, theta: torch.Tensor, shift: float, rhs: torch.Tensor, solver: Solver,
    rtol: float = 1e-10, maxiter: int = 2000,
) -> tuple[torch.Tensor, float]:
    """``(hess fn(theta) + shift I)^{-1} rhs`` and the relative residual of the solution.

    'exact' builds the Hessian and factors it (Cholesky; ValueError when not positive definite);
    'cg' runs conjugate gradients on Hessian-vector products.
    """
    def operator(v: torch.Tensor) -> torch.Tensor:
        return hvp(fn, theta, v) + shift * v

    if solver == "exact":
        factor = damped_cholesky(dense_hessian(fn, theta), shift)
        x = torch.cholesky_solve(rhs.unsqueeze(1), factor).squeeze(1)
    elif solver == "cg":
        batched = vmap(operator, in_dims=1, out_dims=1)
        x = conjugate_gradient(batched, rhs.unsqueeze(1), rtol=rtol, maxiter=maxiter)[0].squeeze(1)
    else:
        raise ValueError(f"unknown solver {solver!r}; expected 'exact' or 'cg'")
    norm = float(torch.linalg.vector_norm(rhs))
    residual = float(torch.linalg.vector_norm(operator(x) - rhs)) / norm if norm else 0.0
    return x, residual


def _sq(v: torch.Tensor) -> torch.Tensor:
    return (v * v).sum()


@_quiet_forward_ad()  # torch's forward-mode AD warns on first use
def multistage_influence(
    embed_pt: nn.Module,
    pretrain_head: nn.Module,
    embed_ft: nn.Module,
    finetune_head: nn.Module,
    pretrain_xy: tuple[torch.Tensor, torch.Tensor],
    finetune_xy: tuple[torch.Tensor, torch.Tensor],
    target_xy: tuple[torch.Tensor, torch.Tensor],
    finetuning: Finetuning,
    pretrain_weight_decay: float,
    solver: Solver = "exact",
) -> MultistageScores:
    """Score every pretraining row (x_a, y_a) against the summed target loss after finetuning.

    ``embed_pt``/``pretrain_head``: W_pt and Th at the end of pretraining; ``embed_ft``/
    ``finetune_head``: W and U at the end of finetuning (for 'frozen', embed_ft holds W_pt).
    Rows are float64 features (n, f) with int64 labels (n,). The finetune-head system is always
    solved exactly (U is small); the pretraining system and the proximal (W, U) system with
    ``solver``. Cost: one pretraining Hessian solve (d_pt = |W| + |Th|), one finetune solve, one
    forward-mode pass over the pretraining rows.
    """
    w_mod, th_mod = FlatModule(embed_pt), FlatModule(pretrain_head)
    u_mod = FlatModule(finetune_head)
    dw = w_mod.size
    w_pt = w_mod.vector()
    theta_pt = torch.cat([w_pt, th_mod.vector()])
    theta_ft = torch.cat([FlatModule(embed_ft).vector(), u_mod.vector()])
    x_a, y_a = pretrain_xy
    x_b, y_b = finetune_xy
    x_t, y_t = target_xy

    def finetune_loss(theta: torch.Tensor) -> torch.Tensor:
        """Mean finetune CE + (wd_ft/2)||U||^2 as a function of (W, U)."""
        logits = u_mod(theta[dw:], w_mod(theta[:dw], x_b))
        return F.cross_entropy(logits, y_b) + 0.5 * finetuning.weight_decay * _sq(theta[dw:])

    def target_loss(theta: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(u_mod(theta[dw:], w_mod(theta[:dw], x_t)), y_t, reduction="sum")

    g_target = grad(target_loss)(theta_ft)
    if finetuning.mode == "frozen":
        u_ft = theta_ft[dw:]
        w_ft = theta_ft[:dw]

        def head_loss(u: torch.Tensor) -> torch.Tensor:
            return finetune_loss(torch.cat([w_ft, u]))

        q, _ = solve_spd(head_loss, u_ft, finetuning.damping, g_target[dw:], "exact")
        # H_WU q = grad_W [grad_U F(W, U) . q]
        mixed = grad(lambda w: grad(finetune_loss)(torch.cat([w, u_ft]))[dw:] @ q)(w_ft)
        rhs_w = g_target[:dw] - mixed
    elif finetuning.mode == "proximal":
        alpha = finetuning.proximal

        def anchored_loss(theta: torch.Tensor) -> torch.Tensor:
            return finetune_loss(theta) + 0.5 * alpha * _sq(theta[:dw] - w_pt)

        p, _ = solve_spd(anchored_loss, theta_ft, finetuning.damping, g_target, solver)
        rhs_w = alpha * p[:dw]
    else:
        raise ValueError(f"unknown finetuning mode {finetuning.mode!r}")

    def pretrain_objective(theta: torch.Tensor) -> torch.Tensor:
        logits = th_mod(theta[dw:], w_mod(theta[:dw], x_a))
        return F.cross_entropy(logits, y_a) + 0.5 * pretrain_weight_decay * _sq(theta)

    def pretrain_losses(theta: torch.Tensor) -> torch.Tensor:
        logits = th_mod(theta[dw:], w_mod(theta[:dw], x_a))
        return F.cross_entropy(logits, y_a, reduction="none")

    rhs = torch.cat([rhs_w, torch.zeros(th_mod.size, dtype=torch.float64)])
    s, residual = solve_spd(pretrain_objective, theta_pt, finetuning.damping, rhs, solver)
    losses, scores = jvp(pretrain_losses, (theta_pt,), (s,))  # scores_a = g_a . s
    return MultistageScores(scores.detach().numpy().copy(), losses.detach().numpy().copy(),
                            residual)


def pretrain_loss_baseline(scores: MultistageScores) -> np.ndarray:
    """The pretraining-loss baseline in the project sign: ``-g(a; theta_pt)`` (high = harmful)."""
    return -scores.pretrain_loss
