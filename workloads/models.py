"""Models that take flat feature rows (n, f) and return logits (n, C), and user factories."""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable

import torch
from torch import nn

from storage.errors import BadInput
from workloads.transformer import text_classifier

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


def logistic_regression(input_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(input_dim, num_classes)


def mlp(input_dim: int, num_classes: int, hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))


def small_cnn(input_shape: tuple[int, ...], num_classes: int, channels: int = 8) -> nn.Module:
    """Two 3x3 conv blocks over (C, H, W) images given as flat rows; GroupNorm, not BatchNorm,
    so per-sample gradients work in any mode."""
    c, _, _ = input_shape
    return nn.Sequential(
        nn.Unflatten(1, input_shape),
        nn.Conv2d(c, channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * channels, num_classes),
    )


BUILTIN = ("logreg", "mlp", "cnn", "minilm")


def model_factory(
    name: str | None,
    factory: str | None,
    *,
    input_dim: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: int,
    trainable_layers: int = 1,
) -> ModelFactory:
    """A zero-argument callable building a fresh model: a built-in by ``name`` or a user's
    ``"package.module:function"`` (called with whichever of input_dim, input_shape,
    num_classes its signature names)."""
    if factory:
        return _user_factory(factory, input_dim, input_shape, num_classes)
    if name == "logreg":
        return lambda: logistic_regression(input_dim, num_classes)
    if name == "mlp":
        return lambda: mlp(input_dim, num_classes, hidden)
    if name == "cnn":
        if len(input_shape) != 3:
            raise BadInput(f"model cnn needs image data (C, H, W); this data has {input_shape}")
        return lambda: small_cnn(input_shape, num_classes)
    if name == "minilm":
        return lambda: text_classifier(num_classes, None, trainable_layers)
    raise BadInput(f"unknown model {name!r}; choose one of {BUILTIN} or give model.factory")


def _user_factory(
    spec: str, input_dim: int, input_shape: tuple[int, ...], num_classes: int
) -> ModelFactory:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BadInput(f"model.factory {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's input
        raise BadInput(f"model.factory {spec!r}: cannot import {module_name}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BadInput(f"model.factory {spec!r}: {module_name} has no callable {attr!r}")
    offered = {"input_dim": input_dim, "input_shape": input_shape, "num_classes": num_classes}
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in offered.items() if k in accepted}

    def build() -> nn.Module:
        model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise BadInput(f"model.factory {spec!r} returned {type(model).__name__}, not a Module")
        return model

    return build
