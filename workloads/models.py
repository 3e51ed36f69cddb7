"""Built-in models (logistic regression, MLP, small CNN) on one input column, and user
factories. A model maps a batch of inputs (``workloads.inputs.call_model``) to logits (n, C)."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable

import torch
from torch import nn

from storage.errors import BadInput
from workloads.transformer import text_classifier
from workloads.user_callables import resolve_hook

ModelFactory = Callable[[], nn.Module]

_INIT_LOCK = threading.Lock()


def seeded_model(factory: ModelFactory, seed: int) -> nn.Module:
    """A fresh model whose initialization is fixed by ``seed``.

    Seeding and construction hold a lock: torch's global generator is shared by threads, so
    concurrent retrains on a thread pool would otherwise interleave their draws.
    """
    with _INIT_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


def logistic_regression(input_dim: int, num_classes: int, flatten: bool = False) -> nn.Module:
    """A linear layer; ``flatten``: rows of any shape are flattened first."""
    linear = nn.Linear(input_dim, num_classes)
    return nn.Sequential(nn.Flatten(), linear) if flatten else linear


def mlp(input_dim: int, num_classes: int, hidden: int = 64, flatten: bool = False) -> nn.Module:
    """One tanh hidden layer; ``flatten``: rows of any shape are flattened first."""
    layers = [nn.Linear(input_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*([nn.Flatten()] if flatten else []), *layers)


def small_cnn(input_shape: tuple[int, ...], num_classes: int, channels: int = 8,
              flat: bool = True) -> nn.Module:
    """Two conv blocks over (C, H, W) images (given as flat rows when ``flat``), no
    normalization layer, so per-sample gradients work in any mode. Small images (H or W < 16,
    e.g. 8x8 digits): 3x3 convolutions, pooled to 2x2; larger ones (e.g. 28x28 MNIST): a 5x5
    stride-2 first convolution and pooling to 3x3, a quarter of the compute."""
    c, h, w = input_shape
    large = min(h, w) >= 16
    first = (nn.Conv2d(c, channels, 5, stride=2, padding=2) if large
             else nn.Conv2d(c, channels, 3, padding=1))
    pooled = 3 if large else 2
    return nn.Sequential(
        *([nn.Unflatten(1, input_shape)] if flat else []),
        first,
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(pooled),
        nn.Flatten(),
        nn.Linear(2 * channels * pooled * pooled, num_classes),
    )


BUILTIN = ("logreg", "mlp", "cnn", "minilm")
TOKEN_INPUTS = ("input_ids", "attention_mask")


def model_factory(
    name: str | None,
    factory: str | None,
    *,
    input_dim: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: int,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    trainable_layers: int = 1,
) -> ModelFactory:
    """A zero-argument callable building a fresh model: a built-in by ``name`` or a user's
    ``"package.module:function"`` (called with whichever of input_dim, input_shape,
    input_shapes, num_classes its signature names). ``input_shapes``: the row shape of each
    input column as the model receives it (default: one flat column of ``input_dim``);
    ``input_shape``: the shape a row of the first column is shown in (images: (C, H, W))."""
    shapes = input_shapes or {"features": (input_dim,)}
    if factory:
        return _user_factory(factory, input_dim, input_shape, num_classes, shapes)
    if name == "minilm":
        if set(shapes) != set(TOKEN_INPUTS):
            raise BadInput(f"model minilm takes token inputs {TOKEN_INPUTS}; the data has "
                           f"{list(shapes)} (data.name tweets, or a Parquet with those columns)")
        return lambda: text_classifier(num_classes, None, trainable_layers)
    if len(shapes) != 1:
        raise BadInput(f"model {name!r} takes one input column; the data has {list(shapes)}: "
                       "give model.factory")
    (row,) = shapes.values()
    if name == "logreg":
        return lambda: logistic_regression(input_dim, num_classes, flatten=len(row) > 1)
    if name == "mlp":
        return lambda: mlp(input_dim, num_classes, hidden, flatten=len(row) > 1)
    if name == "cnn":
        if len(input_shape) != 3:
            raise BadInput(f"model cnn needs image data (C, H, W); this data has {input_shape}")
        return lambda: small_cnn(input_shape, num_classes, flat=len(row) == 1)
    raise BadInput(f"unknown model {name!r}; choose one of {BUILTIN} or give model.factory")


def _user_factory(
    spec: str, input_dim: int, input_shape: tuple[int, ...], num_classes: int,
    input_shapes: dict[str, tuple[int, ...]],
) -> ModelFactory:
    fn = resolve_hook(spec, "model.factory")
    offered = {"input_dim": input_dim, "input_shape": input_shape, "num_classes": num_classes,
               "input_shapes": input_shapes}
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in offered.items() if k in accepted}

    def build() -> nn.Module:
        model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise BadInput(f"model.factory {spec!r} returned {type(model).__name__}, not a Module")
        return model

    return build
