"""Property-based fuzzing of the config loader (hypothesis): whatever the YAML file, the
``--set`` overrides or the already-parsed mapping, loading either returns a Config or raises
BadInput with a one-line message, never another exception."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estimators.registry import ESTIMATORS, estimator_options
from storage.errors import BadInput
from tasks.config import Config, default_config_dict, load_config, validate

SECTIONS = default_config_dict()
KEYS = sorted({*SECTIONS, *(f"{s}.{k}" for s, v in SECTIONS.items() if isinstance(v, dict)
                            for k in v), "estimators", "train.checkpoints", "data.splits.train",
               "targets.utility", "prune.by", "evaluate.loo.samples", "serve.host"})
ESTIMATOR_NAMES = ["ip", "tracin", "loss", "if_exact", "if_cg", "trak", "ip_ensemble", "magic"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(ESTIMATOR_NAMES),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(["name", "path", "lr", "k", "seed"]),
                                  st.text(max_size=6)), inner, max_size=4),
    ),
    max_leaves=10,
)
odd = st.one_of(st.sampled_from([[], "x", None, -1, 0, 0.5, {}, True, float("nan")]), values)
estimator_lists = st.lists(
    st.one_of(
        st.sampled_from(ESTIMATOR_NAMES),
        st.sampled_from(ESTIMATOR_NAMES).flatmap(lambda name: st.fixed_dictionaries(
            {"name": st.just(name)},
            optional={o: odd for o in (estimator_options(name) if name in ESTIMATORS else [])},
        )),
    ),
    min_size=1, max_size=3, unique_by=lambda e: e if isinstance(e, str) else e["name"],
)

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _loads_or_refuses(load) -> None:
    try:
        config = load()
    except BadInput as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return
    assert isinstance(config, Config)


def _yaml_flow(value: object) -> str:
    """``value`` as one line of YAML (how a user would type it after ``--set key=``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.removesuffix("\n...\n").strip()


def _yaml_doc(pairs: list[tuple[str, object]]) -> str:
    """A YAML config file setting each dotted key to its value (later pairs win)."""
    doc: dict = {}
    for key, value in pairs:
        node = doc
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return yaml.safe_dump(doc)


@FUZZ
@given(estimators=estimator_lists, projection=st.one_of(st.none(), st.integers(1, 64)))
def test_any_estimator_list_validates_or_is_refused(estimators, projection):
    raw = default_config_dict()
    raw["estimators"] = estimators
    raw["gradients"]["projection"] = projection
    raw["prune"]["by"] = [e if isinstance(e, str) else e["name"] for e in estimators][:1]
    _loads_or_refuses(lambda: validate(raw))


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=3),
       estimators=st.one_of(st.none(), estimator_lists))
def test_any_mapping_validates_or_is_refused(changes, estimators):
    raw = default_config_dict()
    for key, value in changes:
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    if estimators is not None:
        raw["estimators"] = estimators
    _loads_or_refuses(lambda: validate(raw))


@FUZZ
@given(overrides=st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS),
                        st.one_of(st.text(max_size=20), values.map(_yaml_flow))),
              st.text(max_size=20)),
    max_size=4))
def test_any_overrides_load_or_are_refused(overrides):
    _loads_or_refuses(lambda: load_config(None, overrides))


@FUZZ
@given(document=st.one_of(st.text(max_size=200),
                          st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=4)
                          .map(lambda kv: _yaml_doc(kv))))
def test_any_config_file_loads_or_is_refused(document, tmp_path_factory):
    path = Path(tmp_path_factory.mktemp("fuzz")) / "config.yaml"
    path.write_text(document)
    _loads_or_refuses(lambda: load_config(path))
