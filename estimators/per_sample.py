"""Per-sample gradients of the cross-entropy loss, flattened in a fixed parameter order.

Two routes give the same numbers (to float rounding):

- layerwise (closed form): when the model is an ``nn.Sequential`` tree of Linear and Conv2d
  layers (the only owners of trainable parameters) and elementwise/pooling/reshaping modules
  that treat rows independently, one batched forward and one backward to the layer outputs
  give every layer's input ``a`` and output gradient ``s``; a row's weight gradient is
  ``s_i a_i^T`` (Conv2d: ``s_i patches(a_i)^T``, the patches copied once from a strided
  view), its bias gradient ``s_i`` summed over positions, copied into the (n, d) result.
- vmap: ``torch.func.vmap(grad(loss))`` for any other model, several input columns or a
  custom row cost.

Inputs are one tensor (n, *shape) or, for a model of several input columns, a mapping of name
-> tensor (``workloads.inputs``). Only trainable parameters (``requires_grad``) are
differentiated: a model whose other parameters are frozen (``model.modules``) gets the
gradients of the attributed ones only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from workloads.inputs import Inputs, call_functional, num_rows, take, unsqueeze_rows

RowCost = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A row's cost from its logits (1, C) and label (1,): a scalar."""

ROW_WISE = (
    nn.Sequential, nn.Identity, nn.Flatten, nn.Unflatten, nn.ReLU, nn.Tanh, nn.Sigmoid,
    nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
)
"""Modules without parameters that map each row on its own (Dropout only in eval mode)."""


def parameter_order(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in ``named_parameters()`` order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """The trainable parameters as one vector (d,), in ``parameter_order``."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def per_sample_gradients(
    model: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    chunk_size: int = 256,
    cost: RowCost | None = None,
) -> torch.Tensor:
    """Gradients of ``cost(model(x_i), y_i)`` for every i: shape (n, d), model's dtype.

    ``cost`` maps one row's logits (1, C) and label (1,) to a scalar (default: cross-entropy).
    The model should be in eval mode (dropout off, BatchNorm on running statistics). Rows are
    processed ``chunk_size`` at a time (the memory bound of the intermediates).
    """
    if cost is None and isinstance(x, torch.Tensor) and layerwise_supported(model):
        return _layerwise(model, x, y, chunk_size)
    return _vmapped(model, x, y, chunk_size, cost or F.cross_entropy)


def layerwise_supported(model: nn.Module) -> bool:
    """True when the closed-form route applies (see the module docstring)."""
    owners = set()
    for module in model.modules():
        kind = type(module)
        if kind is nn.Linear:
            owners.add(module)
        elif kind is nn.Conv2d:
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(
                    module.padding, str):
                return False
            owners.add(module)
        elif kind not in ROW_WISE or (kind is nn.Dropout and module.training):
            return False
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    owned = {id(p) for m in owners for p in m.parameters(recurse=False)}
    return bool(trainable) and trainable <= owned


def _layerwise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int):
    params = [p for p in model.parameters() if p.requires_grad]
    offsets, start = {}, 0
    for p in params:
        offsets[id(p)] = start
        start += p.numel()
    out = torch.empty(x.shape[0], start, dtype=params[0].dtype, device=x.device)
    layers = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)
              and any(p.requires_grad for p in m.parameters(recurse=False))]
    for begin in range(0, x.shape[0], chunk_size):
        rows = slice(begin, begin + chunk_size)
        _layerwise_chunk(model, layers, params, x[rows], y[rows], out[rows], offsets)
    return out


def _layerwise_chunk(model, layers, params, x, y, out, offsets) -> None:
    written: set[int] = set()
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def keep(module, inputs, output):
        calls.append((module, inputs[0].detach(), output))

    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        with torch.enable_grad():
            logits = model(x)
            loss = F.cross_entropy(logits, y, reduction="sum")
            grads = torch.autograd.grad(loss, [z for _, _, z in calls], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    n = x.shape[0]
    for (module, a, _), s in zip(calls, grads, strict=True):
        if s is None:
            continue
        w, b = module.weight, module.bias
        if type(module) is nn.Linear:
            a3, s3 = a.reshape(n, -1, a.shape[-1]), s.reshape(n, -1, s.shape[-1])
            gw = torch.bmm(s3.transpose(1, 2), a3) if a3.shape[1] > 1 else (
                s3[:, 0, :, None] * a3[:, 0, None, :])
            gb = s3.sum(1)
        else:
            s3 = s.reshape(n, s.shape[1], -1)
            gw = torch.bmm(s3, _patches(module, a, s.shape[2:]).transpose(1, 2))
            gb = s3.sum(2)
        for p, g in ((w, gw), (b, gb)):
            if p is not None and p.requires_grad:
                o = offsets[id(p)]
                target = out[:, o : o + p.numel()]
                if id(p) in written:
                    target += g.reshape(n, -1)
                else:
                    target.copy_(g.reshape(n, -1))
                    written.add(id(p))
    for p in params:
        if id(p) not in written:
            out[:, offsets[id(p)] : offsets[id(p)] + p.numel()] = 0


def _patches(conv: nn.Conv2d, a: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """The input patch of every output position: (n, C * kh * kw, H_out * W_out), the layout
    of ``F.unfold``, copied once from a strided view of the padded input (``F.unfold``'s
    im2col loops over rows)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv.padding
    a = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a.contiguous()
    (ho, wo), (n, c) = out_hw, a.shape[:2]
    s_n, s_c, s_h, s_w = a.stride()
    view = a.as_strided((n, c, kh, kw, ho, wo),
                        (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw))
    return view.reshape(n, c * kh * kw, ho * wo)


def _vmapped(model, x, y, chunk_size, cost) -> torch.Tensor:
    names = parameter_order(model)
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_one(p: dict, xi: Inputs, yi: torch.Tensor) -> torch.Tensor:
        out = call_functional(model, (p, buffers), unsqueeze_rows(xi))
        return cost(out, yi.unsqueeze(0))

    # slices of chunk_size rows, each one plain vmap call: vmap's own chunk_size option is
    # ~1.7x slower on small MLPs (measured in benchmarks.speed)
    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    blocks = []
    for start in range(0, num_rows(x), chunk_size):
        rows = slice(start, start + chunk_size)
        grads = per_sample(params, take(x, rows), y[rows])
        blocks.append(torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], 1))
    return torch.cat(blocks) if blocks else torch.zeros(0, parameter_count(model), device=y.device)
