"""tasks.config: the embedded default, --set overrides, user files and one-line BadInput."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from estimators.registry import ESTIMATORS
from storage.errors import BadInput
from tasks.config import Config, config_yaml, load_config, validate

DEFAULT_ESTIMATORS = ["random", "loss", "ip", "cosine", "tracin", "if_exact"]


def _bad(*overrides: str, path: Path | None = None, needles: tuple[str, ...] = ()) -> str:
    with pytest.raises(BadInput) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---- the default -------------------------------------------------------------------------


def test_default_has_documented_values() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.seed == 0
    assert cfg.data.name == "digits" and cfg.data.path is None
    assert cfg.data.noise == 0.2
    assert (cfg.data.splits.train, cfg.data.splits.val, cfg.data.splits.test) == (0.6, 0.2, 0.2)
    assert cfg.model.name == "mlp" and cfg.model.factory is None
    assert cfg.train.epochs == 30
    assert cfg.train.checkpoints == 5
    assert cfg.gradients.shard_size == 512 and cfg.gradients.projection is None
    assert [e.name for e in cfg.estimators] == DEFAULT_ESTIMATORS
    assert all(e.options == {} for e in cfg.estimators)
    assert cfg.targets.split == "val" and cfg.targets.pairwise is False
    assert cfg.prune.by == ["tracin"]
    assert cfg.prune.fraction == 0.10
    assert cfg.prune.seeds == 5
    assert cfg.runner == "threads"
    assert cfg.tracking.uri is None and cfg.tracking.experiment == "sieve"


def test_default_validates_from_its_own_yaml() -> None:
    cfg = load_config()
    assert validate(yaml.safe_load(config_yaml(cfg))) == cfg


# ---- overrides ---------------------------------------------------------------------------


def test_set_parses_yaml_values() -> None:
    cfg = load_config(None, ["train.epochs=3", "data.noise=0.05", "tracking.uri=null",
                             "model.name=logreg", "seed=11"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.data.noise == 0.05
    assert cfg.tracking.uri is None
    assert cfg.model.name == "logreg"
    assert cfg.seed == 11


def test_set_estimators_list_and_prune_by() -> None:
    cfg = load_config(None, ["estimators=[ip,tracin]", "prune.by=ip"])
    assert [e.name for e in cfg.estimators] == ["ip", "tracin"]
    assert cfg.prune.by == ["ip"]
    cfg = load_config(None, ["prune.by=[ip, loss]"])
    assert cfg.prune.by == ["ip", "loss"]


def test_later_overrides_win() -> None:
    assert load_config(None, ["train.epochs=3", "train.epochs=4"]).train.epochs == 4


def test_estimators_all() -> None:
    cfg = load_config(None, ["estimators=all"])
    assert [e.name for e in cfg.estimators] == list(ESTIMATORS)
    assert len(cfg.estimators) >= len(DEFAULT_ESTIMATORS)


def test_per_estimator_options(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("estimators:\n  - {name: if_exact, damping: 0.1}\n  - tracin\n"
                    "prune: {by: if_exact}\n")
    cfg = load_config(path)
    assert [e.name for e in cfg.estimators] == ["if_exact", "tracin"]
    assert cfg.estimator("if_exact").options == {"damping": 0.1}
    assert cfg.estimator("tracin").options == {}
    assert cfg.prune.by == ["if_exact"]


def test_user_file_merges_over_default(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train: {epochs: 4}\ndata: {noise: 0.0}\n")
    cfg = load_config(path, ["train.checkpoints=2"])
    assert cfg.train.epochs == 4 and cfg.train.checkpoints == 2
    assert cfg.train.batch_size == 32  # untouched keys keep their defaults
    assert cfg.data.noise == 0.0 and cfg.data.name == "digits"
    assert [e.name for e in cfg.estimators] == DEFAULT_ESTIMATORS


def test_empty_user_file_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == load_config()


def test_data_path_means_parquet() -> None:
    cfg = load_config(None, ["data.path=my.parquet"])
    assert cfg.data.name == "parquet" and cfg.data.path == "my.parquet"


def test_checkpoint_files() -> None:
    cfg = load_config(None, ["train.checkpoints=[{path: a.pt, lr: 0.1}, {path: b.pt, lr: 0.05}]"])
    assert [(c.path, c.lr) for c in cfg.train.checkpoints] == [("a.pt", 0.1), ("b.pt", 0.05)]


# ---- BadInput one-liners -----------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    _bad("colour=red", needles=("colour", "unknown key"))


def test_unknown_nested_key() -> None:
    _bad("train.epochz=3", needles=("train.epochz", "unknown key"))


def test_unknown_key_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: mlp\n  depth: 3\n")
    _bad(path=path, needles=("model.depth", "unknown key"))


def test_wrong_type() -> None:
    _bad("train.epochs=abc", needles=("train.epochs", "integer", "'abc'"))
    _bad("train.epochs=1.5", needles=("train.epochs",))
    _bad("train=3", needles=("train",))


def test_optimizers() -> None:
    assert load_config(None, ["train.optimizer=lbfgs"]).train.optimizer == "lbfgs"
    _bad("train.optimizer=newton", needles=("train.optimizer", "lbfgs"))
    # L-BFGS takes no SGD steps to unroll: named, refused; under `all`, skipped
    _bad("train.optimizer=lbfgs", "estimators=[ip, diffin]", "prune.by=[ip]",
         needles=("diffin", "unroll SGD steps", "lbfgs"))
    every = load_config(None, ["train.optimizer=lbfgs", "estimators=all", "prune.by=[ip]"])
    assert {"diffin", "unrolled_sgd"} <= set(every.skipped)
    assert "lbfgs" in every.skipped["diffin"]


def test_negative_noise() -> None:
    _bad("data.noise=-0.1", needles=("data.noise", "-0.1"))


def test_unknown_estimator() -> None:
    _bad("estimators=[ip, magic]", needles=("estimators", "'magic'"))


def test_unknown_estimator_option() -> None:
    _bad("estimators=[{name: if_exact, dampning: 0.1}]", "prune.by=if_exact",
         needles=("if_exact", "dampning"))


def test_duplicate_or_no_estimators() -> None:
    _bad("estimators=[ip, ip]", "prune.by=ip", needles=("estimators", "twice"))
    _bad("estimators=[]", needles=("estimators",))


def test_prune_by_not_among_estimators() -> None:
    msg = _bad("estimators=[ip, loss]", needles=("prune.by", "tracin"))
    assert "config: config:" not in msg
    _bad("prune.by=ghost", needles=("prune.by", "ghost"))


def test_splits_must_sum_to_one() -> None:
    _bad("data.splits.train=0.7", needles=("data.splits", "sum to 1"))


def test_parquet_needs_a_path() -> None:
    _bad("data.name=parquet", needles=("data", "data.path"))


def test_missing_config_file(tmp_path: Path) -> None:
    _bad(path=tmp_path / "nope.yaml", needles=("not found", "nope.yaml"))


@pytest.mark.parametrize("text", ["train: [1, 2\n", "a: b: c\n", "x:\n\t- 1\n"])
def test_invalid_yaml_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    _bad(path=path, needles=("bad.yaml", "not valid YAML"))


def test_yaml_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    _bad(path=path, needles=("list.yaml", "mapping"))


@pytest.mark.parametrize("item", ["train.epochs", "=3", ""])
def test_set_without_equals(item: str) -> None:
    _bad(item, needles=("--set", "key=value"))


def test_set_value_not_yaml() -> None:
    _bad("estimators=[ip, tracin", needles=("--set", "YAML"))


def test_set_into_a_scalar() -> None:
    _bad("seed.low=1", needles=("seed",))


# ---- round trip --------------------------------------------------------------------------


def test_config_yaml_round_trips() -> None:
    cfg = load_config(None, [
        "estimators=[{name: if_exact, damping: 0.1}, tracin, ip]",
        "prune.by=[tracin, ip]",
        "train.checkpoints=[{path: a.pt, lr: 0.1, step: 40}]",
        "data.path=my.parquet",
        "data.feature_columns=[a, b]",
        "train.schedule=step",
        "seed=9",
    ])
    text = config_yaml(cfg)
    again = validate(yaml.safe_load(text))
    assert again == cfg
    assert again.estimator("if_exact").options == {"damping": 0.1}
    assert config_yaml(again) == text
    # and it is a real comparison: a changed value is not equal
    assert validate(yaml.safe_load(text.replace("seed: 9", "seed: 8"))) != cfg


def test_projection_forms() -> None:
    """The int form (dense, of projection_kind), the dense mapping and the factorized mapping;
    sizes of the wrong kind, k < 1 and unknown kinds are one-line errors."""
    base = ["estimators=[ip]", "prune.by=ip"]
    legacy = load_config(None, [*base, "gradients.projection=64",
                                "gradients.projection_kind=gaussian"]).gradients
    assert (legacy.projection_spec.kind, legacy.projection_spec.k) == ("gaussian", 64)
    dense = load_config(None, [*base, "gradients.projection={kind: rademacher, k: 32, "
                                      "precision: bfloat16}"])
    assert dense.gradients.projection_spec.label == "rademacher"
    assert dense.gradients.projection_spec.precision == "bfloat16"
    factorized = load_config(None, [*base, "gradients.projection={kind: factorized, k_in: 8, "
                                           "k_out: 4}"]).gradients.projection_spec
    assert (factorized.kind, factorized.k_in, factorized.k_out, factorized.k) == (
        "factorized", 8, 4, None)
    assert load_config(None, base).gradients.projection_spec is None
    _bad(*base, "gradients.projection={kind: factorized, k: 8}", needles=("k_in",))
    _bad(*base, "gradients.projection={kind: gaussian, k_in: 8, k_out: 2}", needles=("takes k",))
    _bad(*base, "gradients.projection=0", needles=("projection",))
    _bad(*base, "gradients.projection={kind: sparse, k: 8}", needles=("projection",))
    _bad("gradients.projection={kind: factorized, k_in: 8, k_out: 8}",
         needles=("need unprojected",))
