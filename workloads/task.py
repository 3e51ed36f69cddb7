"""What is differentiated: the training loss hook and the attributed modules (``model.modules``).

A hook is ``"package.module:function"``. The training loss maps (logits (m, C), labels (m,))
to the mean loss of the batch (a scalar); applied to one row it is that row's loss, whose
gradient the gradient stage stores. The attributed parameters are the trainable parameters of
the modules whose dotted name (or the parameter's own name) matches one of the glob patterns;
the others are frozen (``requires_grad=False``) in the model estimators see, so per-sample
gradients, curvature and projections cover the attributed parameters only. Training still
updates every trainable parameter.
"""

from __future__ import annotations

import fnmatch

import torch.nn.functional as F
from torch import nn

from storage.errors import BadInput
from workloads.models import ModelFactory
from workloads.training import LossFn
from workloads.user_callables import resolve_hook


def training_loss(spec: str | None) -> LossFn:
    """The configured training loss (``task.loss``), cross-entropy when None."""
    return F.cross_entropy if spec is None else resolve_hook(spec, "task.loss")


def attributed_names(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Names of the attributed parameters, in ``named_parameters()`` order: the trainable ones
    of the modules matching ``patterns`` (all trainable ones when None). BadInput when a
    pattern matches no module or parameter, or nothing trainable is selected."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if patterns is None:
        return trainable
    names = [name for name, _ in model.named_modules() if name] + [
        name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            shown = ", ".join(n for n, _ in model.named_modules() if n)[:200]
            raise BadInput(f"model.modules: {pattern!r} matches no module of the model "
                           f"(modules: {shown})")
    chosen = [name for name in trainable if _selected(name, patterns)]
    if not chosen:
        raise BadInput(f"model.modules {patterns} select no trainable parameter")
    return chosen


def _selected(parameter: str, patterns: list[str]) -> bool:
    parts = parameter.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pattern) for p in prefixes for pattern in patterns)


def attributed_factory(factory: ModelFactory, patterns: list[str] | None) -> ModelFactory:
    """``factory`` with every parameter outside ``model.modules`` frozen (the model attribution
    sees); ``factory`` itself when every trainable parameter is attributed."""
    if patterns is None:
        return factory

    def build() -> nn.Module:
        model = factory()
        chosen = set(attributed_names(model, patterns))
        for name, p in model.named_parameters():
            if name not in chosen:
                p.requires_grad_(False)
        return model

    return build
