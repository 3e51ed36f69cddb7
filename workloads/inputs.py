"""A sample's inputs: one or more named tensor columns, and how a model is called on them.

``Samples.inputs`` maps an input column name to an (n, *shape) array: floating (float32) for
features and images (C, H, W), int64 for token ids and attention masks. Token sequences are
padded to the longest sequence with 0 when loaded (mask 0 there) and trimmed per batch to the
longest in the batch (``batch_inputs``). A model is called ``model(x)`` for one input column
and ``model(**batch)`` for several (the Hugging Face convention).

The functions below accept a batch as either one tensor (a single input column) or a mapping of
name -> tensor, so estimators written against one tensor keep working on any single column.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

Inputs = Tensor | Mapping[str, Tensor]
"""A batch of model inputs: one tensor (one input column) or name -> (m, *shape) tensors."""

MASK = "attention_mask"
"""The input column whose zeros mark padding (trimmed per batch by ``batch_inputs``)."""


def batch_inputs(
    inputs: Mapping[str, np.ndarray | Tensor], rows: Any, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """The rows ``rows`` (indices, a slice or a bool mask) of every input column as tensors on
    ``device`` (``take``: token columns cut to the longest sequence of the batch)."""
    batch = take({name: _tensor(col) for name, col in inputs.items()}, rows)
    return {name: col.to(device) if device is not None else col for name, col in batch.items()}


def model_inputs(inputs: Mapping[str, Tensor]) -> Inputs:
    """The form estimators and models receive: the tensor itself for one input column, the
    mapping for several."""
    return next(iter(inputs.values())) if len(inputs) == 1 else dict(inputs)


def call_model(model: nn.Module, batch: Inputs) -> Tensor:
    """``model(x)`` for one input column (a tensor or a one-entry mapping), ``model(**batch)``
    for several; the logits (m, C) (an output with a ``logits`` attribute, as Hugging Face's
    ``ModelOutput``, gives that)."""
    if isinstance(batch, Tensor):
        return _logits(model(batch))
    if len(batch) == 1:
        return _logits(model(next(iter(batch.values()))))
    return _logits(model(**batch))


def call_functional(model: nn.Module, tensors: Any, batch: Inputs) -> Tensor:
    """``call_model`` through ``torch.func.functional_call`` with parameters/buffers
    ``tensors`` (a dict or a tuple of dicts)."""
    if isinstance(batch, Tensor):
        return _logits(functional_call(model, tensors, (batch,)))
    if len(batch) == 1:
        return _logits(functional_call(model, tensors, (next(iter(batch.values())),)))
    return _logits(functional_call(model, tensors, (), dict(batch)))


def _logits(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


def num_rows(batch: Inputs) -> int:
    """The number of rows m of a batch."""
    return batch.shape[0] if isinstance(batch, Tensor) else next(iter(batch.values())).shape[0]


def take(batch: Inputs, rows: Any) -> Inputs:
    """Rows ``rows`` of a batch (indices, a slice or a mask), of the same form. With an
    ``attention_mask`` column, every token column (integer, one dimension as long as the mask)
    is cut after the last position any taken row uses: padding per batch."""
    if isinstance(batch, Tensor):
        return batch[_index(rows)]
    out = {name: col[_index(rows)] for name, col in batch.items()}
    mask = out.get(MASK)
    if mask is not None and mask.ndim == 2 and mask.shape[0]:
        used = mask.ne(0).any(0).nonzero()
        keep = int(used.max()) + 1 if len(used) else 1
        if keep < mask.shape[1]:
            out = {name: col[:, :keep] if _is_tokens(col, mask.shape[1]) else col
                   for name, col in out.items()}
    return out


def to_device(batch: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(batch, Tensor):
        return batch.to(device)
    return {name: col.to(device) for name, col in batch.items()}


def cast_floating(batch: Inputs, dtype: torch.dtype) -> Inputs:
    """The floating columns cast to ``dtype`` (token ids and masks stay integers)."""
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    return {name: cast_floating(col, dtype) for name, col in batch.items()}


def unsqueeze_rows(row: Inputs) -> Inputs:
    """One row (as ``vmap`` hands it over, without the batch dimension) as a batch of one."""
    if isinstance(row, Tensor):
        return row.unsqueeze(0)
    return {name: col.unsqueeze(0) for name, col in row.items()}


def inputs_device(batch: Inputs) -> torch.device:
    return batch.device if isinstance(batch, Tensor) else next(iter(batch.values())).device


def _tensor(col: np.ndarray | Tensor) -> Tensor:
    return col if isinstance(col, Tensor) else torch.from_numpy(col)


def _index(rows: Any) -> Any:
    if isinstance(rows, np.ndarray):
        return torch.from_numpy(rows.astype(np.int64) if rows.dtype != bool else rows)
    return rows


def _is_tokens(col: Tensor, length: int) -> bool:
    return not col.is_floating_point() and col.ndim == 2 and col.shape[1] == length
