"""Matrix-free curvature products of the mean cross-entropy (spec sections 4, 11.4).

Every function works on flat parameter vectors (d,) in ``parameter_order(model)`` and on a model
that maps rows (n, ...) to logits (n, C); put the model in eval mode first (dropout off,
BatchNorm on running statistics). The model itself is never modified: parameters are swapped in
with ``torch.func.functional_call`` and its buffers (and frozen parameters) are kept.

Dtype: products are computed in the dtype of the vector they are given (``v`` or ``params``);
the model's parameters, floating buffers and floating inputs are cast to it, so a float32 model
can be probed in float64.

Cost (n rows, d parameters): ``flat_gradient`` one forward + backward pass; ``hvp`` and
``ggn_vp`` about two passes each; ``finite_difference_hvp`` two (central) or two (forward, one of
them at theta) gradient evaluations. Memory is that of one pass over the n rows, so callers chunk
large row sets themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from estimators.per_sample import flat_parameters, parameter_order
from workloads.inputs import Inputs, call_functional, cast_floating, num_rows, take

MatVec = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def _quiet_forward_ad() -> Iterator[None]:
    """torch's forward-mode AD loads TorchScript decompositions on first use and warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script`", DeprecationWarning)
        yield


def _logits_fn(model: nn.Module, x: Inputs) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map a flat parameter vector (d,) to the logits (n, C) of ``model`` on ``x``."""
    names = parameter_order(model)
    trainable = dict(model.named_parameters())
    shapes = [trainable[name].shape for name in names]
    sizes = [trainable[name].numel() for name in names]
    chosen = set(names)
    fixed = {name: t.detach() for name, t in model.named_buffers()}
    fixed.update({name: p.detach() for name, p in trainable.items() if name not in chosen})

    def logits(flat: torch.Tensor) -> torch.Tensor:
        if flat.shape != (sum(sizes),):
            raise ValueError(f"flat parameters must have shape ({sum(sizes)},), got {flat.shape}")
        pieces = torch.split(flat, sizes)
        params = {name: t.view(s) for name, t, s in zip(names, pieces, shapes, strict=True)}
        extra = {
            name: t.to(flat.dtype) if t.is_floating_point() else t for name, t in fixed.items()
        }
        return call_functional(model, (params, extra), cast_floating(x, flat.dtype))

    return logits


def flat_loss(
    model: nn.Module, x: Inputs, y: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping flat parameters (d,) to the mean cross-entropy on (x, y): a 0-d tensor.

    Parameters follow ``parameter_order(model)``; the model's buffers are kept. No weight-decay
    term. Differentiable with ``torch.func`` (grad, jvp, vmap) and autograd.
    """
    logits = _logits_fn(model, x)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits(flat), y)

    return loss


def flat_gradient(
    model: nn.Module, x: Inputs, y: torch.Tensor, params: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient (d,) of the mean cross-entropy on (x, y) at ``params`` (default: the model's
    current flat parameters, in their dtype). No weight-decay term. One forward + backward."""
    theta = flat_parameters(model) if params is None else params.detach()
    return grad(flat_loss(model, x, y))(theta).detach()


def signed_gradient_sums(
    model: nn.Module, x: Inputs, y: torch.Tensor, signs: torch.Tensor, chunk_size: int = 2048
) -> torch.Tensor:
    """``(1/n) sum_i signs[i, j] grad loss_i``: (d, m) for signs (n, m), in signs' dtype.

    Sums of the rows' cross-entropy gradients with the given weights (e.g. random signs: a
    vector shaped like the gradients an influence solve is applied to, which the mean
    gradient, about 0 at a minimum, is not). Cost m forward + backward passes over the rows,
    ``chunk_size`` rows at a time.
    """
    n = num_rows(x)
    theta = flat_parameters(model).to(signs.dtype)
    total = torch.zeros(theta.shape[0], signs.shape[1], dtype=signs.dtype, device=theta.device)
    for start in range(0, n, chunk_size):
        rows, labels = take(x, slice(start, start + chunk_size)), y[start : start + chunk_size]
        logits = _logits_fn(model, rows)

        def weighted(flat: torch.Tensor, w: torch.Tensor, logits=logits, labels=labels
                     ) -> torch.Tensor:
            return (F.cross_entropy(logits(flat), labels, reduction="none") * w).sum() / n

        for j in range(signs.shape[1]):
            total[:, j] += grad(weighted)(theta, signs[start : start + chunk_size, j]).detach()
    return total


def hvp(
    model: nn.Module, x: Inputs, y: torch.Tensor, v: torch.Tensor, weight_decay: float = 0.0
) -> torch.Tensor:
    """Exact Hessian-vector product ``(H + weight_decay * I) v``: (d,), in v's dtype.

    H is the Hessian of the mean cross-entropy on (x, y) at the model's parameters, so this is the
    curvature of ``mean CE + (weight_decay/2) ||theta||^2``. Forward-over-reverse
    (``jvp`` of ``grad``); may be indefinite for non-convex models. Cost about two passes.
    """
    theta = flat_parameters(model).to(v.dtype)
    with _quiet_forward_ad():
        _, product = jvp(grad(flat_loss(model, x, y)), (theta,), (v,))
    return product + weight_decay * v


def ggn_vp(
    model: nn.Module, x: Inputs, y: torch.Tensor, v: torch.Tensor, weight_decay: float = 0.0
) -> torch.Tensor:
    """Gauss-Newton-vector product ``(G + weight_decay * I) v``: (d,), in v's dtype.

    ``G = (1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i`` with J_i (C, d) the logit Jacobian of
    row i and p_i its softmax; PSD. ``J v`` by ``jvp``, ``J^T u`` by ``vjp``. Cost about two
    passes (one forward-mode, one reverse-mode).
    """
    theta = flat_parameters(model).to(v.dtype)
    logits = _logits_fn(model, x)
    with _quiet_forward_ad():
        z, jv = jvp(logits, (theta,), (v,))
    prob = torch.softmax(z.detach(), dim=-1)
    h_out = prob * jv - prob * (prob * jv).sum(dim=-1, keepdim=True)
    _, pullback = vjp(logits, theta)
    (product,) = pullback(h_out / z.shape[0])
    return product + weight_decay * v


def finite_difference_hvp(
    model: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-3,
    central: bool = True,
) -> torch.Tensor:
    """Finite-difference check of ``hvp`` (weight decay 0): (d,), in v's dtype.

    With u = v / ||v||: central ``(g(theta + eps u) - g(theta - eps u)) ||v|| / (2 eps)``, forward
    ``(g(theta + eps u) - g(theta)) ||v|| / eps``; g the mean cross-entropy gradient. Truncation
    error O(eps^2) (central) or O(eps) (forward); use float64. Cost two gradient evaluations.
    """
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        return torch.zeros_like(v)
    step = eps * v / norm
    theta = flat_parameters(model).to(v.dtype)
    plus = flat_gradient(model, x, y, theta + step)
    if central:
        minus = flat_gradient(model, x, y, theta - step)
        return (plus - minus) * norm / (2 * eps)
    return (plus - flat_gradient(model, x, y, theta)) * norm / eps


def power_iteration(
    matvec: MatVec,
    d: int,
    iters: int = 20,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> float:
    """Estimate the largest eigenvalue of a symmetric operator ``matvec`` ((d,) -> (d,)).

    Starts from a seeded random unit vector (generated on the CPU, then moved to ``device``),
    iterates ``v <- A v / ||A v||`` and returns the Rayleigh quotient ``v^T A v`` of the last
    iterate. For a PSD operator this is a lower bound on lambda_max that converges like
    (lambda_2/lambda_1)^iters; for an indefinite one it tracks the eigenvalue of largest
    magnitude. Cost ``iters + 1`` products.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=gen, dtype=dtype).to(device)
    v = v / torch.linalg.vector_norm(v)
    for _ in range(iters):
        w = matvec(v)
        norm = torch.linalg.vector_norm(w)
        if not torch.isfinite(norm):
            raise ValueError("power iteration produced a non-finite vector")
        if norm == 0:
            return 0.0
        v = w / norm
    return float(v @ matvec(v))


def in_dtype(operator: MatVec, dtype: torch.dtype) -> MatVec:
    """``operator`` applied in ``dtype``: v is cast to it and the product back to v's dtype."""
    return lambda v: operator(v.to(dtype)).to(v.dtype)


def curvature_operator(
    model: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    kind: str = "ggn",
    shift: float = 0.0,
    chunk_size: int = 2048,
    column_block: int = 32,
) -> MatVec:
    """The operator ``v -> (C + shift * I) v`` over all rows of (x, y), for v (d,) or (d, m).

    C is the GGN (``kind="ggn"``, PSD) or the exact Hessian (``kind="hessian"``) of the mean
    cross-entropy over the rows, accumulated over row chunks of ``chunk_size`` (weighted by their
    size, so the result does not depend on the chunking). A matrix is multiplied column by
    column under ``torch.func.vmap``, ``column_block`` columns at a time. Output in v's dtype and
    shape. Cost per column about two passes over the rows.
    """
    if kind not in ("ggn", "hessian"):
        raise ValueError(f"unknown curvature {kind!r}; expected 'ggn' or 'hessian'")
    if chunk_size < 1 or column_block < 1:
        raise ValueError("chunk_size and column_block must be >= 1")
    n = num_rows(x)
    if n == 0:
        raise ValueError("curvature_operator needs at least one row")
    product = ggn_vp if kind == "ggn" else hvp
    chunks = [(take(x, slice(s, s + chunk_size)), y[s : s + chunk_size])
              for s in range(0, n, chunk_size)]

    def one(v: torch.Tensor) -> torch.Tensor:
        total = shift * v
        for rows, labels in chunks:
            total = total + product(model, rows, labels, v) * (labels.shape[0] / n)
        return total

    batched = vmap(one, in_dims=1, out_dims=1)

    def apply(v: torch.Tensor) -> torch.Tensor:
        if v.ndim == 1:
            return one(v)
        if v.ndim != 2:
            raise ValueError(f"expected a vector (d,) or a matrix (d, m), got {tuple(v.shape)}")
        with _quiet_forward_ad():
            blocks = [
                batched(v[:, s : s + column_block]) for s in range(0, v.shape[1], column_block)
            ]
        return torch.cat(blocks, dim=1) if blocks else v.clone()

    return apply


def arnoldi_eigenpairs(
    matvec: MatVec,
    d: int,
    n_iter: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    breakdown_tol: float = 1e-10,
    block: int = 1,
    stop: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
    check_every: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric operator from (block) Arnoldi (Schioppa et al. 2021).

    Builds an orthonormal Krylov basis Q of up to ``n_iter`` vectors from a seeded random
    (d, ``block``) start, applying ``matvec`` to ``block`` columns at a time ((d, b) -> (d, b);
    block 1 passes vectors (d,)); every new block is orthogonalized twice against all previous
    vectors (full re-orthogonalization). Where a new direction vanishes (norm below
    ``breakdown_tol`` times the largest ``||A q||`` seen) a fresh random vector orthogonal to
    the basis takes its place, so ``n_iter = d`` always spans the whole space. Q^T A Q over the
    vectors whose products are known is symmetrized and diagonalized.

    ``stop(basis, projected)``, when given, is called every ``check_every`` products and after
    the last with the Krylov basis so far Q (d, k) and the symmetrized ``Q^T A Q`` (k, k) (no
    eigendecomposition: a caller that only needs ``Q (Q^T A Q + s I)^{-1} Q^T`` solves with
    it); True ends the iteration there. Returns
    (eigenvalues (k,), descending; eigenvectors U (d, k), orthonormal columns), k the number of
    products (``n_iter`` unless stopped). Cost k products, O(d k^2) time, O(d n_iter) memory.
    """
    if not 1 <= n_iter <= d:
        raise ValueError(f"n_iter must be in [1, d={d}], got {n_iter}")
    if block < 1 or check_every < 1:
        raise ValueError(f"block and check_every must be >= 1, got {block}, {check_every}")
    gen = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n_iter, d, dtype=dtype, device=device)  # Q^T: prefixes stay contiguous
    projected = torch.zeros(n_iter, n_iter, dtype=dtype, device=device)

    def orthonormal(candidates: torch.Tensor, filled: int, scale: float) -> torch.Tensor:
        """Columns orthonormal to the first ``filled`` basis vectors and each other, spanning
        the candidates (already orthogonal to the basis); vanished ones replaced by random
        directions."""
        known = rows[:filled]

        def outside(q: torch.Tensor, accepted: list[torch.Tensor]) -> torch.Tensor:
            for _ in range(2):
                q = q - known.T @ (known @ q)
                for a in accepted:
                    q = q - a * (a @ q)
            return q

        fast, triangle = torch.linalg.qr(candidates)  # candidates are already outside the basis
        if bool((triangle.diagonal().abs() > breakdown_tol * scale).all()):
            return fast
        out: list[torch.Tensor] = []
        for j in range(candidates.shape[1]):
            q, size = outside(candidates[:, j], out), scale
            while float(torch.linalg.vector_norm(q)) <= breakdown_tol * size:
                q, size = outside(torch.randn(d, generator=gen, dtype=dtype).to(device), out), 1.0
            out.append(q / torch.linalg.vector_norm(q))
        return torch.stack(out, dim=1)

    width = min(block, n_iter)
    rows[:width] = orthonormal(torch.randn(d, width, generator=gen, dtype=dtype).to(device),
                               0, 0.0).T
    filled, done, largest, checked = width, 0, 0.0, 0

    def symmetric(k: int) -> torch.Tensor:
        return (projected[:k, :k] + projected[:k, :k].T) / 2

    while done < n_iter:
        cols = slice(done, filled)
        current = rows[cols].T
        w = matvec(current[:, 0]).unsqueeze(1) if block == 1 else matvec(current)
        largest = max(largest, float(torch.linalg.vector_norm(w, dim=0).max()))
        for _ in range(2):
            coefficients = rows[:filled] @ w
            projected[:filled, cols] += coefficients
            w = w - rows[:filled].T @ coefficients
        done = filled
        room = min(block, n_iter - filled)
        if room > 0:
            new = orthonormal(w[:, :room], filled, largest)
            rows[filled : filled + room] = new.T
            projected[filled : filled + room, cols] = new.T @ w
            filled += room
        if stop is not None and (done - checked >= check_every or done == n_iter):
            checked = done
            if stop(rows[:done].T, symmetric(done)):
                break
    return ritz_pairs(rows[:done].T, symmetric(done))


def dense_eigenpairs(
    matvec: MatVec, d: int, dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric operator from its whole matrix: ``matvec`` ((d, m) -> (d, m))
    applied to the d columns of the identity at once, symmetrized, diagonalized. Returns
    (eigenvalues (d,), descending; orthonormal eigenvectors (d, d)): what ``arnoldi_eigenpairs``
    reaches with ``n_iter = d``, without its orthogonalization. Cost d products, O(d^3) time,
    O(d^2) memory."""
    matrix = matvec(torch.eye(d, dtype=dtype, device=device))
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return values.flip(0), vectors.flip(1)


def ritz_pairs(basis: torch.Tensor, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz pairs of an operator A on the span of an orthonormal basis Q (d, k), from the
    symmetric ``projected = Q^T A Q`` (k, k): eigenvalues (k,), descending, and vectors
    Q Y (d, k). Cost O(k^3 + d k^2)."""
    values, vectors = torch.linalg.eigh(projected)
    order = torch.argsort(values, descending=True)
    return values[order], basis @ vectors[:, order]
