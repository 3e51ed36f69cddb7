"""storage.yaml12: YAML 1.2's float rule (``1e-4`` is a number), the rest as PyYAML's safe
loader."""

from __future__ import annotations

import math

import pytest
import yaml

from storage.yaml12 import load_yaml


@pytest.mark.parametrize(("text", "value"), [
    ("1e-4", 1e-4), ("1E+3", 1000.0), ("-2.5e-3", -2.5e-3), ("+3e2", 300.0), (".5", 0.5),
    ("1.", 1.0), ("0.1", 0.1), ("1.0e-20", 1e-20), (".inf", math.inf), ("-.inf", -math.inf),
])
def test_floats_as_yaml_1_2_reads_them(text: str, value: float) -> None:
    got = load_yaml(text)
    assert isinstance(got, float) and got == value


def test_pyyaml_alone_reads_1e_4_as_a_string() -> None:
    """The bug this loader exists for (YAML 1.1 wants a dot)."""
    assert yaml.safe_load("1e-4") == "1e-4"


@pytest.mark.parametrize(("text", "value"), [
    ("10", 10), ("-3", -3), ("true", True), ("null", None), ("abc", "abc"), ("1e4x", "1e4x"),
    ("e5", "e5"), ("'1e-4'", "1e-4"),
])
def test_other_scalars_unchanged(text: str, value: object) -> None:
    got = load_yaml(text)
    assert got == value and type(got) is type(value)


def test_nan_and_nested() -> None:
    assert math.isnan(load_yaml(".nan"))
    assert load_yaml("[1e-4, {damping: 1e-4}]") == [1e-4, {"damping": 1e-4}]


def test_unsafe_tags_are_refused() -> None:
    with pytest.raises(yaml.YAMLError):
        load_yaml("!!python/object/apply:os.system ['true']")
