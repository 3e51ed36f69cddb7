"""Factorized per-layer random projection (LoGra, Choe et al. 2024): the gradient never formed.

For a Linear layer the per-sample gradient of ``[W | b]`` is ``G = sum_t s_t [a_t; 1]^T``
(t: positions; one for a plain Linear, the sequence for 3-d inputs, the output pixels of a
Conv2d with ``a_t`` the input patch), with ``a`` the layer input and ``s`` the gradient of the
row's cost with respect to the layer output. With ``P_in`` ((d_in + 1) x k_in, the bias row
last when the layer has a bias) and ``P_out`` (d_out x k_out) of i.i.d. +-1 or N(0, 1) entries
(the dense projection's counter-based generator, ``estimators.projection``), the layer's
features are

    x = P_out^T G P_in / sqrt(k_in k_out) = sum_t (P_out^T s_t)(P_in^T [a_t; 1])^T / sqrt(..)

(k_out x k_in, row-major), i.e. ``(P_out kron P_in)^T vec(G)``: a dense projection whose
matrix is a Kronecker product, so ``E[x_1 . x_2] = g_1 . g_2`` per layer and in total. Per
layer ``k_in`` and ``k_out`` are capped at the layer's (d_in + 1) and d_out. The features of
all layers are concatenated in layer order: k = sum_l k_in_l k_out_l.

``features`` computes them from hooks: the forward hook projects ``a`` at once (a Conv2d input
by a convolution with P_in as its kernel, so no patch matrix is formed) and keeps the output;
one backward to the layer outputs gives ``s``, projected and contracted over positions. Memory
is O(rows x positions x (k_in + k_out)) on top of the forward's activations; no (rows x d)
tensor exists. ``project`` maps flat gradients (m, d) the same way (for gradients that exist
anyway, e.g. utility targets) and agrees with ``features`` to float rounding.

Covered layers: every Linear and Conv2d (groups 1, zero padding) owning a trainable parameter,
or the modules named in ``modules``; every trainable parameter must belong to a covered layer
(freeze the others). Rows must be independent (eval mode). Features are computed in float32
(float64 for float64 models), rows in zero-padded blocks of ``block_rows`` so a row's arithmetic
never depends on the other rows of a call: bit-identical across shard layouts on one device and
dtype, within float32 rounding across devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from estimators.projection import KINDS, ProjectionKind, draw_rows, stream_key
from workloads.inputs import Inputs, call_model, take

RowsCost = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(model output (m, C), labels (m,)) -> per-row cost (m,); the features are its gradient's."""
ModelCall = Callable[[nn.Module, Inputs], torch.Tensor]


def cross_entropy_rows(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def rows_of_cost(cost: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> RowsCost:
    """A per-row cost of batches from a one-row cost (``estimators.per_sample.RowCost``: logits
    (1, C), label (1,) -> scalar), vmapped; None: the cross-entropy."""
    if cost is None:
        return cross_entropy_rows

    def rows(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.vmap(lambda row, label: cost(row[None], label[None]))(logits, y)

    return rows


@dataclass(frozen=True)
class Layer:
    """One covered layer: its module name, kind, sizes and its parameters' flat offsets."""

    name: str
    kind: str  # "linear" or "conv2d"
    d_out: int
    d_in: int  # weight columns (Conv2d: C * kh * kw), without the bias column
    weight_offset: int
    bias_offset: int | None
    k_in: int
    k_out: int

    @property
    def features(self) -> int:
        return self.k_in * self.k_out

    @property
    def rows_in(self) -> int:
        return self.d_in + (self.bias_offset is not None)


def covered_layers(model: nn.Module, k_in: int, k_out: int,
                   modules: Sequence[str] | None = None) -> tuple[Layer, ...]:
    """The layers a factorized projection of ``model`` covers, in module order (ValueError when
    a trainable parameter is outside them or a layer is not supported)."""
    offsets, start = {}, 0
    for p in model.parameters():
        if p.requires_grad:
            offsets[id(p)] = start
            start += p.numel()
    named = dict(model.named_modules())
    wanted = list(modules) if modules is not None else [
        n for n, m in named.items() if type(m) in (nn.Linear, nn.Conv2d)
        and any(p.requires_grad for p in m.parameters(recurse=False))]
    layers, covered = [], set()
    for name in wanted:
        module = named.get(name)
        if type(module) not in (nn.Linear, nn.Conv2d):
            raise ValueError(f"factorized projection covers Linear and Conv2d layers; {name!r} "
                             f"is {type(module).__name__}")
        if type(module) is nn.Conv2d and (module.groups != 1 or module.padding_mode != "zeros"
                                          or isinstance(module.padding, str)):
            raise ValueError(f"factorized projection: Conv2d {name!r} needs groups=1 and "
                             "numeric zero padding")
        w, b = module.weight, module.bias
        if not w.requires_grad:
            raise ValueError(f"factorized projection: the weight of {name!r} is frozen")
        has_bias = b is not None and b.requires_grad
        d_out, d_in = w.shape[0], w[0].numel()
        layers.append(Layer(name, "linear" if type(module) is nn.Linear else "conv2d", d_out,
                            d_in, offsets[id(w)], offsets[id(b)] if has_bias else None,
                            min(k_in, d_in + has_bias), min(k_out, d_out)))
        covered |= {id(w)} | ({id(b)} if has_bias else set())
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if outside:
        raise ValueError(f"factorized projection: trainable parameters {outside[:3]} are not in "
                         "a covered Linear/Conv2d layer; freeze them or select their modules")
    if not layers:
        raise ValueError("factorized projection: the model has no trainable Linear/Conv2d layer")
    return tuple(layers)


@dataclass(frozen=True)
class FactorizedProjector:
    """Per-layer Kronecker projection ``(m, d) -> (m, k)``; see the module docstring.

    ``layers`` from ``covered_layers``; ``dim`` the flat gradient length d of the model's
    trainable parameters. ``block_rows``: rows per padded block of ``features``.
    """

    k_in: int
    k_out: int
    seed: int
    kind: ProjectionKind = "rademacher"
    layers: tuple[Layer, ...] = field(kw_only=True)
    dim: int = field(kw_only=True)
    model_id: int = 0
    block_rows: int = 256
    _matrices: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.k_in < 1 or self.k_out < 1:
            raise ValueError(f"k_in and k_out must be >= 1, got {self.k_in}, {self.k_out}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}; expected one of {KINDS}")
        if self.seed < 0 or self.model_id < 0 or self.block_rows < 1:
            raise ValueError("seed and model_id must be >= 0, block_rows >= 1")

    @classmethod
    def for_model(cls, model: nn.Module, k_in: int, k_out: int, seed: int,
                  kind: ProjectionKind = "rademacher", model_id: int = 0,
                  modules: Sequence[str] | None = None, **options: Any) -> FactorizedProjector:
        """A projector over ``model``'s Linear/Conv2d layers (or ``modules``)."""
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return cls(k_in, k_out, seed, kind, layers=covered_layers(model, k_in, k_out, modules),
                   dim=dim, model_id=model_id, **options)

    @property
    def k(self) -> int:
        """Features per row: sum over layers of k_in_l * k_out_l."""
        return sum(layer.features for layer in self.layers)

    def metadata(self) -> dict[str, Any]:
        return {
            "kind": "factorized", "entries": self.kind, "k": self.k, "k_in": self.k_in,
            "k_out": self.k_out, "seed": self.seed, "model_id": self.model_id,
            "layers": [[lay.name, lay.d_out, lay.rows_in, lay.k_out, lay.k_in]
                       for lay in self.layers],
            "scale": "1/sqrt(k_in_l k_out_l) per layer",
            "seeding": "counter_hash(SeedSequence([seed, model_id, layer_index, 0 in/1 out]))",
        }

    def matrices(self, index: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_in (d_in [+1], k_in), P_out (d_out, k_out)) of layer ``index``, cached."""
        key = (index, str(device), dtype)
        cached = self._matrices.get(key)
        if cached is None:
            layer = self.layers[index]
            p_in = draw_rows(stream_key(self.seed, self.model_id, index, 0), 0, layer.rows_in,
                             layer.k_in, self.kind, device, dtype)
            p_out = draw_rows(stream_key(self.seed, self.model_id, index, 1), 0, layer.d_out,
                              layer.k_out, self.kind, device, dtype)
            cached = self._matrices.setdefault(key, (p_in, p_out))
        return cached

    def project(self, grads: torch.Tensor, dtype: torch.dtype = torch.float32,
                first_row: int = 0) -> torch.Tensor:
        """Flat gradients (m, d) in the model's parameter order -> (m, k) as ``dtype``.

        Each row is its own (batched) product, so ``first_row`` (accepted for the dense
        projector's signature) changes nothing."""
        if grads.ndim != 2 or grads.shape[1] != self.dim:
            raise ValueError(
                f"expected gradients of shape (m, d={self.dim}), got {tuple(grads.shape)}")
        work = torch.float64 if grads.dtype == torch.float64 else torch.float32
        m, pieces = grads.shape[0], []
        for index, layer in enumerate(self.layers):
            p_in, p_out = self.matrices(index, grads.device, work)
            w = layer.weight_offset
            g = grads[:, w : w + layer.d_out * layer.d_in].to(work).reshape(m, layer.d_out, -1)
            if layer.bias_offset is not None:
                b = grads[:, layer.bias_offset : layer.bias_offset + layer.d_out].to(work)
                g = torch.cat([g, b[:, :, None]], dim=2)
            x = p_out.T @ g @ p_in / math.sqrt(layer.features)
            pieces.append(x.reshape(m, -1))
        return torch.cat(pieces, dim=1).to(dtype)

    def features(self, model: nn.Module, x: Inputs, y: torch.Tensor, *,
                 cost: RowsCost = cross_entropy_rows, call: ModelCall = call_model,
                 dtype: torch.dtype = torch.float32, first_row: int = 0) -> torch.Tensor:
        """Projected per-sample gradients of ``cost(call(model, x_i), y_i)``: (m, k) as ``dtype``,
        on the model's device.

        Rows go through the model in zero-padded blocks of ``block_rows`` aligned to the global
        row index (``first_row`` is the index of row 0, e.g. a shard's start): row i always sits
        at position ``(first_row + i) % block_rows`` of a block of the same shape, so its
        arithmetic (the GEMM kernels pick paths by shape and position) is the same however the
        rows are sharded. ``x`` is a tensor or a mapping of input columns
        (``workloads.inputs``; token columns are cut per block by ``take``, so for text the
        block's width varies and bits may differ across layouts).
        """
        m, block = y.shape[0], self.block_rows
        device = next(model.parameters()).device
        work = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
        out = torch.empty(m, self.k, dtype=dtype, device=device)
        first = first_row - first_row % block
        for base in range(first, first_row + m, block):
            lo, hi = max(base, first_row) - first_row, min(base + block, first_row + m) - first_row
            at = lo + first_row - base
            xb = _placed(take(x, slice(lo, hi)), at, block)
            yb = _placed(y[lo:hi], at, block)
            out[lo:hi] = self._block(model, xb, yb, cost, call, work)[at : at + hi - lo]
        return out

    def _block(self, model: nn.Module, x: Inputs, y: torch.Tensor, cost: RowsCost,
               call: ModelCall, work: torch.dtype) -> torch.Tensor:
        named = dict(model.named_modules())
        seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        handles = []
        for index, layer in enumerate(self.layers):
            handles.append(named[layer.name].register_forward_hook(self._keeper(index, seen,
                                                                               work)))
        try:
            with torch.enable_grad():
                rows = cost(call(model, x), y)
                outputs = [z for _, _, z in seen]
                grads = torch.autograd.grad(rows.sum(), outputs, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        n = y.shape[0]
        acc = [torch.zeros(n, lay.k_out, lay.k_in, dtype=work, device=y.device)
               for lay in self.layers]
        with torch.no_grad():
            for (index, pa, _), s in zip(seen, grads, strict=True):
                if s is None:
                    continue
                _, p_out = self.matrices(index, s.device, work)
                if self.layers[index].kind == "conv2d":
                    ps = torch.einsum("nchw,ck->nkhw", s.to(work), p_out).reshape(n, p_out.shape[1],
                                                                                   -1)
                    acc[index] += torch.bmm(ps, pa)
                else:
                    ps = s.to(work).reshape(n, -1, s.shape[-1]) @ p_out
                    acc[index] += torch.bmm(ps.transpose(1, 2), pa)
        pieces = [a.reshape(n, -1) / math.sqrt(lay.features) for a, lay in zip(acc, self.layers,
                                                                                strict=True)]
        return torch.cat(pieces, dim=1)

    def _keeper(self, index: int, seen: list, work: torch.dtype):
        """Forward hook: project the layer input at once (Linear: (n, T, k_in); Conv2d: a
        convolution with P_in as the kernel, (n, H_out W_out, k_in)) and keep the output."""
        layer = self.layers[index]

        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            a = inputs[0].detach().to(work).contiguous()
            p_in, _ = self.matrices(index, a.device, work)
            bias_row = p_in[layer.d_in] if layer.bias_offset is not None else None
            with torch.no_grad():
                if layer.kind == "conv2d":
                    kernel = p_in[: layer.d_in].T.reshape(layer.k_in, *module.weight.shape[1:])
                    pa = F.conv2d(a, kernel.to(a.dtype), bias_row, module.stride,
                                  module.padding, module.dilation)
                    pa = pa.reshape(a.shape[0], layer.k_in, -1).transpose(1, 2)
                else:
                    pa = a.reshape(a.shape[0], -1, a.shape[-1]) @ p_in[: layer.d_in]
                    if bias_row is not None:
                        pa = pa + bias_row
            seen.append((index, pa, output))

        return keep


def _placed(part: Inputs, at: int, rows: int) -> Inputs:
    """``part`` at rows [at, at + len) of ``rows`` zero rows (a tensor, or each column of a
    mapping; padded rows are computed and dropped, never mixed with real ones)."""
    if not isinstance(part, torch.Tensor):
        return {name: _placed(col, at, rows) for name, col in part.items()}
    if part.shape[0] == rows:
        return part
    block = part.new_zeros((rows, *part.shape[1:]))
    block[at : at + part.shape[0]] = part
    return block


def make_projector(model: nn.Module, spec: Any, seed: int,
                   model_id: int = 0) -> Any:
    """The projector a ``gradients.projection`` setting asks for (see ``tasks.config``):
    ``Projector`` for the dense kinds, ``FactorizedProjector`` for "factorized"."""
    from estimators.projection import Projector

    if spec.kind == "factorized":
        return FactorizedProjector.for_model(model, spec.k_in, spec.k_out, seed,
                                             kind=spec.entries, model_id=model_id,
                                             modules=getattr(spec, "modules", None))
    return Projector.for_model(model, spec.k, seed, kind=spec.kind, model_id=model_id,
                               precision=getattr(spec, "precision", "float32"))
