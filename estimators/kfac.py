"""K-FAC / EK-FAC influence functions (the Kronfluence approach), spec section 4.

Sources: Grosse et al., arXiv 2308.03296 (influence with EK-FAC); George et al., arXiv 1806.03884
(EK-FAC); https://github.com/pomonam/kronfluence. The curvature is block-diagonal over the
``nn.Linear`` and ``nn.Conv2d`` modules of the model; every other trainable parameter (LayerNorm,
embeddings, bare ``nn.Parameter`` s, grouped or asymmetrically padded convolutions, Linear
modules whose forward is never called, ...) is *excluded*: it contributes nothing to the scores
and its name is listed in ``EKFACInfluence.excluded_parameters`` after each call.

Per supported module (weight (o, p') plus an optional bias, p = p' + 1 with a bias):

- ``a`` (p,): the module input (Linear) or one unfolded input patch (Conv2d, ``F.unfold``), with a
  trailing 1 when the bias is trainable; ``s`` (o,): the loss gradient w.r.t. the module output at
  one position. A per-example gradient is ``G = sum_t s_t a_t^T`` (o, p), t over positions
  (spatial positions of a Conv2d, extra leading dims of a Linear input; one position otherwise).
- Pass 1: ``A = E_{example, t}[a a^T]`` (p, p), ``S = E_example[sum_t s_t s_t^T]`` (o, o), with
  labels drawn from the model's predictive distribution (true Fisher = GGN for cross-entropy), or
  the true labels (empirical Fisher). ``S kron A`` (acting on the row-major vec of G) then
  approximates the Fisher of the *mean* training loss; for a Conv2d this is KFC's
  ``T * E[s s^T] kron E[a a^T]``, T positions (Kronfluence averages S over positions too, which
  makes its K-FAC eigenvalues T times smaller; EK-FAC is unaffected).
  Eigendecompose ``A = Q_A diag(e_A) Q_A^T``, ``S = Q_S diag(e_S) Q_S^T``.
- K-FAC: ``Lambda = e_S e_A^T`` (o, p). EK-FAC, pass 2: ``Lambda = E_example[(Q_S^T G Q_A)^2]``
  (elementwise square), over the same sampled labels.
- Inverse: ``H^{-1} V = Q_S [(Q_S^T V Q_A) / (Lambda + damping + weight_decay)] Q_A^T``.

Scores are computed in the eigenbasis: with ``G'_z = Q_S^T G_z Q_A``, ``score(z) = sum_modules
<G'_V / D, G'_z>`` and ``suspicion(z) = sum_modules <G'_z^2, 1 / D>``, D the denominator above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from estimators.base import Attribution, Estimator, Needs, PairwiseStream, ScoringContext
from estimators.damping import check_damping, relative_damping, resolve
from estimators.per_sample import parameter_order
from workloads.inputs import Inputs, call_model, num_rows, take

Kind = Literal["ekfac", "kfac"]
KINDS: tuple[str, ...] = ("ekfac", "kfac")


@dataclass
class KroneckerBlock:
    """One supported module: its name, the module, and the parameter names it covers."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None

    @property
    def parameters(self) -> list[str]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]


@dataclass
class _Eigen:
    """Factors of one block: eigenvectors Q_S (o, o), Q_A (p, p) and 1/D (o, p), float64."""

    q_s: torch.Tensor
    q_a: torch.Tensor
    inverse: torch.Tensor
    damping: float


def _conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric integer padding of a Conv2d for ``F.unfold``; None when it has none."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            return None  # "same" with an even receptive field pads asymmetrically
        return (totals[0] // 2, totals[1] // 2)
    return (int(module.padding[0]), int(module.padding[1]))


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and _conv_padding(module) is not None
        )
    return False


def kronecker_blocks(model: nn.Module) -> tuple[list[KroneckerBlock], list[str]]:
    """The supported modules whose weight is trainable, and the excluded trainable parameters.

    Supported: ``nn.Linear`` (any subclass) and ``nn.Conv2d`` with ``groups=1`` and symmetric
    zero padding (integers, ``"valid"``, or ``"same"`` with an odd receptive field). A frozen
    bias is treated as a constant (no 1 appended). Returns (blocks in ``named_modules`` order,
    excluded names in ``parameter_order``). Raises ValueError when one parameter is shared by two
    supported modules (tied weights).
    """
    blocks: list[KroneckerBlock] = []
    owner: dict[int, str] = {}
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    for module_name, module in model.named_modules():
        if not _supported(module) or not module.weight.requires_grad:
            continue
        bias = module.bias if module.bias is not None and module.bias.requires_grad else None
        for p in (module.weight, bias):
            if p is None:
                continue
            if id(p) in owner:
                raise ValueError(
                    f"parameter {names[id(p)]!r} is shared by modules {owner[id(p)]!r} and "
                    f"{module_name!r}; tied weights are not supported by K-FAC"
                )
            owner[id(p)] = module_name
        blocks.append(
            KroneckerBlock(
                name=module_name,
                module=module,
                weight=names[id(module.weight)],
                bias=None if bias is None else names[id(bias)],
            )
        )
    covered = {n for b in blocks for n in b.parameters}
    excluded = [n for n in parameter_order(model) if n not in covered]
    return blocks, excluded


def _layer_io(
    block: KroneckerBlock, inputs: torch.Tensor, out_grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (B, T, p), s (B, T, o)) in float64 from a module's input and output gradient."""
    module = block.module
    batch = inputs.shape[0]
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(
            inputs,
            kernel_size=module.kernel_size,
            dilation=module.dilation,
            padding=_conv_padding(module),
            stride=module.stride,
        )  # (B, C_in * k1 * k2, L), channel-major like weight.reshape(o, -1)
        a = patches.transpose(1, 2)
        s = out_grad.reshape(batch, out_grad.shape[1], -1).transpose(1, 2)
    else:
        a = inputs.reshape(batch, -1, inputs.shape[-1])
        s = out_grad.reshape(batch, -1, out_grad.shape[-1])
    a, s = a.to(torch.float64), s.to(torch.float64)
    if block.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
    return a, s


def _summed_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def _capture(
    model: nn.Module,
    blocks: list[KroneckerBlock],
    x: Inputs,
    y: torch.Tensor,
    cost: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _summed_ce,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward/backward of ``cost(model(x), y)``: per block (a, s) (see ``_layer_io``).

    ``cost`` must be a sum of per-row terms for ``s`` to hold per-example gradients.
    """
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def make_hook(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if i in outputs:
                raise ValueError(
                    f"module {blocks[i].name!r} is called more than once per forward pass; "
                    "shared modules are not supported by K-FAC"
                )
            inputs[i] = args[0].detach()
            outputs[i] = output

        return hook

    handles = [b.module.register_forward_hook(make_hook(i)) for i, b in enumerate(blocks)]
    try:
        with torch.enable_grad():
            loss = cost(call_model(model, x), y)
    finally:
        for handle in handles:
            handle.remove()
    missing = [blocks[i].name for i in range(len(blocks)) if i not in outputs]
    if missing:
        raise RuntimeError(f"modules {missing} were not called in the forward pass")
    grads = torch.autograd.grad(
        loss, [outputs[i] for i in range(len(blocks))], allow_unused=True
    )
    return [
        _layer_io(b, inputs[i], torch.zeros_like(outputs[i]) if g is None else g.detach())
        for i, (b, g) in enumerate(zip(blocks, grads, strict=True))
    ]


def _rotated(eig: _Eigen, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-example gradients in the eigenbasis, ``Q_S^T G Q_A``: (B, o, p)."""
    return torch.einsum("bto,bti->boi", s @ eig.q_s, a @ eig.q_a)


def _called_blocks(model: nn.Module, blocks: list[KroneckerBlock], x: Inputs) -> list[bool]:
    """Which blocks' forward hooks fire (exactly once) on one probe row."""
    calls = [0] * len(blocks)

    def make_hook(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            calls[i] += 1

        return hook

    handles = [b.module.register_forward_hook(make_hook(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            call_model(model, take(x, slice(0, 1)))
    finally:
        for handle in handles:
            handle.remove()
    shared = [b.name for b, c in zip(blocks, calls, strict=True) if c > 1]
    if shared:
        raise ValueError(
            f"modules {shared} are called more than once per forward pass; shared modules are "
            "not supported by K-FAC"
        )
    return [c == 1 for c in calls]


class EKFACInfluence(Estimator):
    """Influence with a block-diagonal (E)K-FAC curvature over Linear/Conv2d modules.

    ``score(z) = g_V^T (F_kfac + (damping + weight_decay) I)^{-1} g_z`` restricted to the
    supported modules, with g_V the gradient of ``ctx.target`` (default: summed target loss) and
    g_z the cross-entropy gradient of train sample z, both at the final checkpoint. F_kfac
    approximates the Fisher/GGN of the *mean* training loss, so like ``ExactInfluence`` the score
    is about ``n * [U(theta_without_z) - U(theta)]``: positive = beneficial. ``suspicion(z) =
    g_z^T (F_kfac + ...)^{-1} g_z >= 0``. Outputs (n,), float64, in ``ctx.train_ids`` order.

    Options: ``kind`` "ekfac" (eigenvalue-corrected, default) or "kfac"; ``damping`` per module,
    None = 0.1 * mean(Lambda) of that module (Kronfluence's default, the first term of
    ``estimators.damping``'s rule: its Hessian term lowered this estimator's LDS on digits-mlp
    from 0.771 to 0.678), ``ctx.weight_decay`` is added
    on top; ``sample_labels`` True draws labels from the model's softmax (seed ``ctx.seed``; true
    Fisher = GGN), False uses the true labels (empirical Fisher); ``max_samples`` fits the factors
    on a seeded random subset of that many train rows (None = all).

    Cost: 2 passes (K-FAC) or 3 passes (EK-FAC) of forward+backward over the train rows (factor
    fit, Lambda fit, scoring) plus one over the target rows, in chunks of ``ctx.batch_size``;
    eigendecompositions O(p^3 + o^3) per module; scoring O(n * T * (o p (o + p))) per module.
    Memory O(p^2 + o^2 + o p) per module plus one chunk's per-example gradients (B, o, p);
    ``pairwise`` holds the preconditioned gradients (m, o, p) per module of at most
    ``target_memory_mb`` worth of target rows (or ``target_rows`` rows) at a time: when all m
    fit, one pass over the train rows scores them all; otherwise the targets go in chunks that
    fit (the factors fitted once and reused), each chunk scored by one pass over the train rows
    (kronfluence's query batching), and the (n, m) float64 scores are gathered on the host
    before they stream out.

    Excluded parameters (see module docstring) are listed in ``excluded_parameters`` after a call.
    No stored gradients are used: per-example gradients come from forward hooks.
    """

    name = "if_ekfac"
    needs = Needs(checkpoints="final", gradients=False, model=True)

    def __init__(
        self,
        kind: Kind = "ekfac",
        damping: float | None = None,
        sample_labels: bool = True,
        max_samples: int | None = None,
        target_memory_mb: int = 2048,
        target_rows: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        check_damping(damping)
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.kind = kind
        self.damping = damping
        self.sample_labels = sample_labels
        if target_memory_mb < 1 or (target_rows is not None and target_rows < 1):
            raise ValueError("target_memory_mb and target_rows must be >= 1, got "
                             f"{target_memory_mb}, {target_rows}")
        self.target_rows = target_rows
        self.max_samples = max_samples
        self.target_memory_mb = target_memory_mb
        self.excluded_parameters: list[str] = []
        """Trainable parameters outside the supported modules (no contribution to scores)."""
        self.module_damping: dict[str, float] = {}
        """The damping used per module name (without weight decay), after a call."""

    # ---------------------------------------------------------------- factors

    def _setup(self, ctx: ScoringContext) -> tuple[nn.Module, list[KroneckerBlock]]:
        model = ctx.model_at(ctx.final)
        blocks, excluded = kronecker_blocks(model)
        if blocks and num_rows(ctx.train_x):
            called = _called_blocks(model, blocks, ctx.train_x)
            excluded += [n for b, c in zip(blocks, called, strict=True) if not c
                         for n in b.parameters]
            blocks = [b for b, c in zip(blocks, called, strict=True) if c]
        order = parameter_order(model)
        self.excluded_parameters = [n for n in order if n in set(excluded)]
        if not blocks:
            raise ValueError(
                "if_ekfac found no trainable nn.Linear / nn.Conv2d module that the forward pass "
                f"calls; excluded parameters: {self.excluded_parameters}"
            )
        return model, blocks

    def _factors(
        self, ctx: ScoringContext, model: nn.Module, blocks: list[KroneckerBlock]
    ) -> list[_Eigen]:
        """Passes 1 (A, S) and, for EK-FAC, 2 (Lambda) over the factor rows."""
        n = num_rows(ctx.train_x)
        rows = np.arange(n)
        if self.max_samples is not None and self.max_samples < n:
            rng = np.random.default_rng(np.random.SeedSequence([ctx.seed, 0x4B464143]))
            rows = np.sort(rng.choice(n, size=self.max_samples, replace=False))
        index = torch.as_tensor(rows, device=ctx.train_y.device)
        x, y = take(ctx.train_x, index), ctx.train_y[index]
        chunks = [slice(i, i + ctx.batch_size) for i in range(0, len(rows), ctx.batch_size)]
        gen = torch.Generator().manual_seed(int(ctx.seed))
        labels: list[torch.Tensor] = []  # drawn in pass 1, reused by pass 2

        def fisher_cost(logits: torch.Tensor, true_labels: torch.Tensor) -> torch.Tensor:
            drawn = true_labels
            if self.sample_labels:
                prob = torch.softmax(logits.detach().to(torch.float64), dim=1).cpu()
                drawn = torch.multinomial(prob, 1, generator=gen).squeeze(1).to(logits.device)
            labels.append(drawn)
            return F.cross_entropy(logits, drawn, reduction="sum")

        a_cov: list[torch.Tensor | None] = [None] * len(blocks)
        s_cov: list[torch.Tensor | None] = [None] * len(blocks)
        a_count = [0] * len(blocks)
        for chunk in chunks:
            captured = _capture(model, blocks, take(x, chunk), y[chunk], fisher_cost)
            for k, (a, s) in enumerate(captured):
                a2, s2 = a.reshape(-1, a.shape[2]), s.reshape(-1, s.shape[2])
                a_cov[k] = a2.T @ a2 if a_cov[k] is None else a_cov[k] + a2.T @ a2
                s_cov[k] = s2.T @ s2 if s_cov[k] is None else s_cov[k] + s2.T @ s2
                a_count[k] += a2.shape[0]
        eigens: list[_Eigen] = []
        lambdas: list[torch.Tensor] = []
        for k in range(len(blocks)):
            e_a, q_a = torch.linalg.eigh(_sym(a_cov[k] / a_count[k]))
            e_s, q_s = torch.linalg.eigh(_sym(s_cov[k] / len(rows)))
            eigens.append(_Eigen(q_s=q_s, q_a=q_a, inverse=q_s.new_zeros(0), damping=0.0))
            lambdas.append(torch.outer(e_s.clamp(min=0), e_a.clamp(min=0)))
        if self.kind == "ekfac":
            lambdas = [torch.zeros_like(lam) for lam in lambdas]
            for chunk, drawn in zip(chunks, labels, strict=True):
                for k, (a, s) in enumerate(_capture(model, blocks, take(x, chunk), drawn)):
                    lambdas[k] += _rotated(eigens[k], a, s).square().sum(dim=0)
            lambdas = [lam / len(rows) for lam in lambdas]
        self.module_damping = {}
        for block, eig, lam in zip(blocks, eigens, lambdas, strict=True):
            damping = resolve(self.damping, lambda lam=lam: relative_damping(float(lam.mean())))
            denom = lam + (damping + ctx.weight_decay)
            eig.inverse = torch.where(denom > 0, 1 / denom.clamp(min=1e-300), 0.0)
            eig.damping = damping
            self.module_damping[block.name] = damping
        return eigens

    # ---------------------------------------------------------------- scoring

    def _target_rotated(
        self,
        ctx: ScoringContext,
        model: nn.Module,
        blocks: list[KroneckerBlock],
        eigens: list[_Eigen],
        per_row: bool,
        rows_of: slice = slice(None),
    ) -> list[torch.Tensor]:
        """Preconditioned target gradients in the eigenbasis, per block: ``G'_V / D`` (1, o, p),
        or with ``per_row`` one per target row (m, o, p) of the target rows ``rows_of``."""
        target = ctx.target
        target_x, target_y = take(ctx.target_x, rows_of), ctx.target_y[rows_of]
        m = num_rows(target_x)
        if m == 0:
            raise ValueError("if_ekfac needs at least one target row")
        if per_row and not target.decomposable:
            raise ValueError(
                f"target {target.name!r} is not a sum over rows; it has no per-row attributions"
            )
        step = ctx.batch_size if target.decomposable else m
        parts: list[list[torch.Tensor]] = [[] for _ in blocks]
        for start in range(0, m, step):
            rows = slice(start, start + step)
            captured = _capture(model, blocks, take(target_x, rows), target_y[rows],
                                target.cost)
            for k, (a, s) in enumerate(captured):
                g = _rotated(eigens[k], a, s)
                parts[k].append(g if per_row else g.sum(dim=0, keepdim=True))
        out = []
        for k, eig in enumerate(eigens):
            g = torch.cat(parts[k]) if per_row else torch.stack(parts[k]).sum(dim=0)
            out.append(g * eig.inverse)
        return out

    def _train_blocks(
        self,
        ctx: ScoringContext,
        model: nn.Module,
        blocks: list[KroneckerBlock],
        eigens: list[_Eigen],
        targets: list[torch.Tensor],
        with_self: bool,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]]:
        """Per ``ctx.batch_size`` train rows, computed when asked for: (train ids (b,), scores
        (b, m) against the preconditioned targets, self-influence (b,) when ``with_self``),
        float64."""
        ids = np.asarray(ctx.train_ids, dtype=np.int64)
        for start in range(0, num_rows(ctx.train_x), ctx.batch_size):
            rows = slice(start, start + ctx.batch_size)
            y = ctx.train_y[rows]
            captured = _capture(model, blocks, take(ctx.train_x, rows), y)
            score = torch.zeros(y.shape[0], targets[0].shape[0], dtype=torch.float64,
                                device=y.device)
            self_inf = (torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
                        if with_self else None)
            for k, (a, s) in enumerate(captured):
                g = _rotated(eigens[k], a, s)
                score += torch.einsum("boi,moi->bm", g, targets[k])
                if self_inf is not None:
                    self_inf += (g.square() * eigens[k].inverse).sum(dim=(1, 2))
            yield ids[rows], score, self_inf

    def score(self, ctx: ScoringContext) -> Attribution:
        model, blocks = self._setup(ctx)
        eigens = self._factors(ctx, model, blocks)
        targets = self._target_rotated(ctx, model, blocks, eigens, per_row=False)
        _, scores, selfs = zip(*self._train_blocks(ctx, model, blocks, eigens, targets, True),
                               strict=True)
        ids = np.asarray(ctx.train_ids, dtype=np.int64)
        return Attribution(sample_ids=ids, score=torch.cat(scores)[:, 0].cpu().numpy(),
                           suspicion=torch.cat(selfs).cpu().numpy())

    def pairwise_stream(self, ctx: ScoringContext) -> PairwiseStream:
        """``pairwise`` block by block: the factors and the m preconditioned target rows
        ((m, o, p) per module) are computed now, then each ``ctx.batch_size`` train rows'
        per-example gradients are scored against them when asked for (memory independent of
        n). Needs a decomposable target."""
        model, blocks = self._setup(ctx)
        eigens = self._factors(ctx, model, blocks)
        m = num_rows(ctx.target_x)
        target_ids = np.asarray(np.arange(m) if ctx.target_ids is None else ctx.target_ids,
                                dtype=np.int64)
        chunk = self.target_chunk(eigens)
        if chunk >= m:
            targets = self._target_rotated(ctx, model, blocks, eigens, per_row=True)
            scored = self._train_blocks(ctx, model, blocks, eigens, targets, False)
            return PairwiseStream(target_ids, ((ids, score) for ids, score, _ in scored))
        return PairwiseStream(target_ids, self._chunked_targets(ctx, model, blocks, eigens,
                                                                chunk))

    def target_chunk(self, eigens: list[_Eigen]) -> int:
        """``target_rows``, or the target rows whose preconditioned gradients (float64, o * p
        per module) fit ``target_memory_mb`` (at least 1)."""
        if self.target_rows is not None:
            return self.target_rows
        per_row = 8 * sum(e.q_s.shape[0] * e.q_a.shape[0] for e in eigens)
        return max(1, self.target_memory_mb * 2**20 // per_row)

    def _chunked_targets(
        self, ctx: ScoringContext, model: nn.Module, blocks: list[KroneckerBlock],
        eigens: list[_Eigen], chunk: int,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Target chunks outer, one pass over the train rows each; blocks of the gathered
        (n, m) scores (host memory), in train order."""
        m, columns, ids = num_rows(ctx.target_x), [], None
        for start in range(0, m, chunk):
            targets = self._target_rotated(ctx, model, blocks, eigens, per_row=True,
                                           rows_of=slice(start, start + chunk))
            parts = list(self._train_blocks(ctx, model, blocks, eigens, targets, False))
            ids = [part[0] for part in parts]
            columns.append([part[1].cpu() for part in parts])
            del targets
        for b, block_ids in enumerate(ids or []):
            yield block_ids, torch.cat([col[b] for col in columns], dim=1)

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores of every train row against every single target row (``ctx.target_x``):
        (train ids (n,), target ids (m,), (n, m) float64), same sign and scale as ``score``;
        the columns sum to ``score`` for a decomposable target. Needs a decomposable target.
        The gathered ``pairwise_stream``."""
        stream = self.pairwise_stream(ctx)
        ids, scores = zip(*stream.blocks, strict=True)
        return (np.concatenate(ids), stream.target_ids, torch.cat(scores).cpu().numpy())


def _sym(m: torch.Tensor) -> torch.Tensor:
    return (m + m.T) / 2
