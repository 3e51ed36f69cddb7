"""The one YAML reader for configs and ``--set`` values: PyYAML's safe loader with YAML 1.2's
float rule, so ``1e-4`` and ``1E+3`` are numbers (YAML 1.1, PyYAML's default, wants a dot and
reads ``1e-4`` as the string "1e-4")."""

from __future__ import annotations

import re
from typing import Any

import yaml

_FLOAT = "tag:yaml.org,2002:float"
# YAML 1.2 core schema floats (plus 1.1's ``1.`` and ``+.inf``): a dot or an exponent.
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
         |[-+]?[0-9]+[eE][-+]?[0-9]+
         |[-+]?\.(?:inf|Inf|INF)
         |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class Yaml12Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose implicit float rule is YAML 1.2's (ints, bools and nulls as
    before: an int still resolves first)."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(_FLOAT, _FLOAT_12, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse one YAML document with the 1.2 float rule. Raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=Yaml12Loader)
