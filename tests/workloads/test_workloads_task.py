"""model.modules (which parameters are attributed) and the task hooks."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from estimators.per_sample import parameter_count, parameter_order, per_sample_gradients
from estimators.targets import MarginTarget
from estimators.trak import margins
from storage.errors import BadInput
from tasks.config import load_config
from workloads.task import attributed_factory, attributed_names, resolve_hook, training_loss


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Sequential(nn.Linear(5, 5), nn.Tanh()),
                         nn.Linear(5, 3))


def test_patterns_select_modules_in_parameter_order() -> None:
    model = _net()
    assert attributed_names(model, None) == [n for n, _ in model.named_parameters()]
    assert attributed_names(model, ["3", "2.*"]) == ["2.0.weight", "2.0.bias", "3.weight",
                                                      "3.bias"]
    assert attributed_names(model, ["0.weight"]) == ["0.weight"]  # a parameter by name
    model[0].bias.requires_grad_(False)  # frozen by the factory: never attributed
    assert attributed_names(model, ["0"]) == ["0.weight"]


def test_gradients_cover_only_the_selected_parameters() -> None:
    torch.manual_seed(0)
    full = _net().eval()
    state = full.state_dict()

    def factory() -> nn.Module:
        model = _net()
        model.load_state_dict(state)
        return model

    chosen = attributed_factory(factory, ["2*", "3"])().eval()
    assert parameter_order(chosen) == ["2.0.weight", "2.0.bias", "3.weight", "3.bias"]
    assert parameter_count(chosen) == 5 * 5 + 5 + 5 * 3 + 3
    x, y = torch.randn(7, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    everything = per_sample_gradients(full, x, y)
    selected = per_sample_gradients(chosen, x, y)
    skipped = 4 * 5 + 5
    assert selected.shape == (7, parameter_count(chosen))
    torch.testing.assert_close(selected, everything[:, skipped:])
    assert attributed_factory(factory, None) is factory


@pytest.mark.parametrize("patterns,needle", [
    (["encoder*"], "'encoder*' matches no module"),
    (["1"], "select no trainable parameter"),  # Tanh: a module without parameters
])
def test_bad_patterns_are_refused(patterns, needle) -> None:
    with pytest.raises(BadInput, match=re.escape(needle)):
        attributed_names(_net(), patterns)


def test_hooks_resolve_or_fail_in_one_line() -> None:
    assert training_loss(None) is torch.nn.functional.cross_entropy
    assert resolve_hook("torch.nn.functional:mse_loss", "task.loss") is nn.functional.mse_loss
    with pytest.raises(BadInput, match="task.loss 'no_such_mod:f': cannot import"):
        training_loss("no_such_mod:f")
    with pytest.raises(BadInput, match="has no callable 'nope'"):
        resolve_hook("torch:nope", "task.measurement")


def test_margin_measurement_is_minus_the_trak_margin() -> None:
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(MarginTarget().cost(logits, y), -margins(logits, y).sum())


@pytest.mark.parametrize("sets,needle", [
    (["task.loss=torch.nn.functional:cross_entropy"],
     "task.loss: estimators ['loss', 'if_exact'] differentiate the cross-entropy themselves"),
    (["task.measurement=margin", "targets.utility=robustness"],
     "task.measurement replaces the per-sample loss"),
    (["task.loss=no colon"], "task.loss: String should match pattern"),
    (["task.loss=m:f", "estimators=[ip]", "prune.by=ip", "train.models=2"],
     "task.loss needs train.models 1"),
])
def test_hook_config_is_checked(sets, needle) -> None:
    with pytest.raises(BadInput, match=re.escape(needle)):
        load_config(None, sets)


def test_vmap_route_differentiates_only_the_attributed_parameters() -> None:
    torch.manual_seed(3)
    full = _net().eval()
    state = full.state_dict()

    def factory() -> nn.Module:
        model = _net()
        model.load_state_dict(state)
        return model

    chosen = attributed_factory(factory, ["0"])().eval()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    ce = torch.nn.functional.cross_entropy  # a cost: the torch.func route
    selected = per_sample_gradients(chosen, x, y, cost=ce)
    torch.testing.assert_close(selected, per_sample_gradients(full, x, y, cost=ce)[:, :25])
