"""Config numbers as people write them: ``1e-4`` in ``--set`` values and in config files is a
float (YAML 1.2), everywhere a config is parsed (regression: issue 15)."""

from __future__ import annotations

from pathlib import Path

from tasks.config import config_yaml, load_config, load_resolved_config


def test_set_weight_decay_in_exponent_notation() -> None:
    cfg = load_config(None, ["train.weight_decay=1e-4"])
    assert cfg.train.weight_decay == 1e-4


def test_estimator_option_in_exponent_notation_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  weight_decay: 5E-4\nestimators:\n  - {name: if_cg, damping: 1e-4}\n"
                    "prune:\n  by: [if_cg]\n")
    cfg = load_config(path)
    assert cfg.train.weight_decay == 5e-4
    assert cfg.estimator("if_cg").options == {"damping": 1e-4}


def test_set_estimator_list_with_exponent_option() -> None:
    cfg = load_config(None, ["estimators=[{name: if_cg, damping: 1e-4}]", "prune.by=[if_cg]"])
    assert cfg.estimator("if_cg").options["damping"] == 1e-4


def test_a_stored_config_reads_back(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.weight_decay=1e-4"])
    path = tmp_path / "config.yaml"
    text = config_yaml(cfg)
    assert "0.0001" in text
    path.write_text(text.replace("0.0001", "1e-4"))
    assert load_resolved_config(path) == cfg
