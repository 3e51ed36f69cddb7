"""workloads.models: built-in models and user factories ("module:function")."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from storage.errors import BadInput
from workloads.models import model_factory

DIGITS = dict(input_dim=64, input_shape=(1, 8, 8), num_classes=10, hidden=16)
_counter = itertools.count()


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
def test_builtin_maps_rows_to_logits(name: str) -> None:
    torch.manual_seed(0)
    build = model_factory(name, None, **DIGITS)
    model = build()
    assert isinstance(model, nn.Module)
    x = torch.rand(5, 64)
    out = model(x)
    assert out.shape == (5, 10)
    assert out.dtype == torch.float32
    # gradients flow to every parameter
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # each call builds a fresh model
    assert build() is not model


def test_mlp_uses_hidden_width() -> None:
    model = model_factory("mlp", None, **{**DIGITS, "hidden": 7})()
    assert sum(p.numel() for p in model.parameters()) == 64 * 7 + 7 + 7 * 10 + 10


def test_cnn_refuses_non_image_input() -> None:
    with pytest.raises(BadInput, match="cnn") as info:
        model_factory("cnn", None, input_dim=64, input_shape=(64,), num_classes=10, hidden=16)
    assert "\n" not in str(info.value)


def test_unknown_builtin() -> None:
    with pytest.raises(BadInput, match="'resnet'"):
        model_factory("resnet", None, **DIGITS)


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    """Write ``source`` as a fresh, uniquely named module on sys.path; return its name."""
    name = f"user_models_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_user_factory_gets_only_the_kwargs_it_names(tmp_path, monkeypatch) -> None:
    mod = _module(tmp_path, monkeypatch, """
        from torch import nn

        CALLS = []

        def narrow(num_classes, input_dim):
            CALLS.append(("narrow", dict(num_classes=num_classes, input_dim=input_dim)))
            return nn.Linear(input_dim, num_classes)

        def shaped(input_shape, width=3):
            CALLS.append(("shaped", dict(input_shape=input_shape, width=width)))
            return nn.Linear(input_shape[-1] * input_shape[-2], width)

        def nothing():
            CALLS.append(("nothing", {}))
            return nn.Linear(64, 10)
    """)
    import importlib

    module = importlib.import_module(mod)
    out = model_factory("mlp", f"{mod}:narrow", **DIGITS)()
    assert out(torch.zeros(2, 64)).shape == (2, 10)
    out = model_factory("mlp", f"{mod}:shaped", **DIGITS)()
    assert out(torch.zeros(2, 64)).shape == (2, 3)
    model_factory("mlp", f"{mod}:nothing", **DIGITS)()
    assert module.CALLS == [
        ("narrow", {"num_classes": 10, "input_dim": 64}),
        ("shaped", {"input_shape": (1, 8, 8), "width": 3}),
        ("nothing", {}),
    ]


def test_user_factory_in_a_package(tmp_path, monkeypatch) -> None:
    pkg = f"user_pkg_{next(_counter)}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "nets.py").write_text(
        "from torch import nn\n\n"
        "def make(input_dim, num_classes):\n"
        "    return nn.Sequential(nn.Linear(input_dim, 4), nn.Linear(4, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = model_factory(None, f"{pkg}.nets:make", **DIGITS)()
    assert model(torch.zeros(3, 64)).shape == (3, 10)


def test_user_factory_that_does_not_import(tmp_path, monkeypatch) -> None:
    broken = _module(tmp_path, monkeypatch, "import not_a_real_package_xyz\n")
    with pytest.raises(BadInput, match="cannot import") as info:
        model_factory(None, f"{broken}:make", **DIGITS)
    assert broken in str(info.value)
    with pytest.raises(BadInput, match="cannot import"):
        model_factory(None, "no_such_module_abc:make", **DIGITS)
    syntax = _module(tmp_path, monkeypatch, "def make(:\n")
    with pytest.raises(BadInput, match="cannot import"):
        model_factory(None, f"{syntax}:make", **DIGITS)


def test_user_factory_missing_attribute(tmp_path, monkeypatch) -> None:
    mod = _module(tmp_path, monkeypatch, "VALUE = 3\n")
    with pytest.raises(BadInput, match="'make'"):
        model_factory(None, f"{mod}:make", **DIGITS)
    with pytest.raises(BadInput, match="'VALUE'"):
        model_factory(None, f"{mod}:VALUE", **DIGITS)


def test_user_factory_returning_a_non_module(tmp_path, monkeypatch) -> None:
    mod = _module(tmp_path, monkeypatch, "def make(input_dim):\n    return [input_dim]\n")
    build = model_factory(None, f"{mod}:make", **DIGITS)
    with pytest.raises(BadInput, match="returned list, not a Module"):
        build()


@pytest.mark.parametrize("spec", ["just_a_module", "module:", ":function", ":"])
def test_malformed_spec(spec: str) -> None:
    with pytest.raises(BadInput, match="package.module:function") as info:
        model_factory(None, spec, **DIGITS)
    assert repr(spec) in str(info.value)


def test_seeded_model_is_the_same_under_concurrent_construction():
    from concurrent.futures import ThreadPoolExecutor

    from workloads.models import mlp, seeded_model

    def build(seed: int):
        return torch.cat([p.detach().reshape(-1) for p in
                          seeded_model(lambda: mlp(64, 10, 256), seed).parameters()])

    alone = [build(seed) for seed in range(8)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(build, [s for _ in range(5) for s in range(8)]))
    for i, params in enumerate(together):
        assert torch.equal(params, alone[i % 8])
    assert not torch.equal(alone[0], alone[1])
