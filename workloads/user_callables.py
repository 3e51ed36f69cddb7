"""A user's function named in the config as 'package.module:function' (model.factory, task.loss,
task.measurement), imported on demand."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from storage.errors import BadInput


def resolve_hook(spec: str, key: str) -> Callable:
    """The callable named by ``spec`` ('package.module:function'); BadInput naming ``key``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BadInput(f"{key} {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's input
        raise BadInput(f"{key} {spec!r}: cannot import {module_name}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BadInput(f"{key} {spec!r}: {module_name} has no callable {attr!r}")
    return fn
