"""tasks.config.screen_estimators and ``skipped``: an estimator that cannot run is refused when
named, skipped (with its reason) when ``estimators: all`` brought it in."""

from __future__ import annotations

import pytest
import yaml

from estimators.registry import ESTIMATORS
from storage.errors import BadInput
from tasks.config import config_yaml, load_config, screen_estimators, validate


def test_named_is_refused_in_one_line() -> None:
    cfg = load_config(None, ["estimators=[ip, {name: if_exact, max_params: 10}]", "prune.by=ip"])
    with pytest.raises(BadInput) as info:
        screen_estimators(cfg, 11)
    msg = str(info.value)
    assert msg.startswith("estimator if_exact cannot run on this model: ") and "\n" not in msg
    assert "max_params >= 11" in msg
    assert screen_estimators(cfg, 10) == cfg  # within the limit: unchanged


def test_all_skips_with_the_reason_and_keeps_the_rest() -> None:
    cfg = load_config(None, ["estimators=all"])
    screened = screen_estimators(cfg, 7000)
    assert list(screened.skipped) == ["if_exact"]
    assert "set max_params >= 7000" in screened.skipped["if_exact"]
    assert [e.name for e in screened.estimators] == [n for n in ESTIMATORS if n != "if_exact"]
    assert cfg.skipped == {}  # the input config is not changed
    again = validate(yaml.safe_load(config_yaml(screened)))  # the stored config reads back
    assert again == screened


def test_all_cannot_skip_what_prune_by_needs() -> None:
    cfg = load_config(None, ["estimators=all", "prune.by=[if_exact]"])
    with pytest.raises(BadInput, match="prune.by names if_exact, which cannot run"):
        screen_estimators(cfg, 7000)


def test_all_with_projection_skips_the_full_gradient_estimators() -> None:
    cfg = load_config(None, ["estimators=all", "gradients.projection=64"])
    assert "if_exact" in cfg.skipped and "ip" not in cfg.skipped
    assert all(r == "needs unprojected gradients: drop gradients.projection"
               for r in cfg.skipped.values())
    assert not set(cfg.skipped) & {e.name for e in cfg.estimators}


def test_skipped_and_listed_is_refused() -> None:
    with pytest.raises(BadInput, match="also listed under estimators"):
        load_config(None, ["estimators=[ip]", "prune.by=ip", "skipped={ip: why}"])


def test_all_with_a_task_loss_skips_the_cross_entropy_estimators() -> None:
    cfg = load_config(None, ["estimators=all", "task.loss=torch.nn.functional:cross_entropy"])
    assert {"if_exact", "gex", "diffin", "unrolled_sgd"} <= set(cfg.skipped)
    assert "ip" in [e.name for e in cfg.estimators] and "ip" not in cfg.skipped
    assert cfg.skipped["gex"] == "differentiates the cross-entropy itself: drop task.loss"
