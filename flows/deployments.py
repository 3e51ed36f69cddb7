"""What ``sieve serve`` deploys: one entry flow per Sieve flow, with typed parameters.

The parameters are the Prefect UI's form (the server refuses values outside their types and
bounds). An entry flow builds the config — the YAML file ``config``, then ``overrides``
(``key=value`` as with ``--set``), then the form's fields — and runs the same flow as the CLI,
in the store named by ``$SIEVE_STORE`` and the config's MLflow experiment, then logs the same
run table and attaches it to the Prefect run as an artifact. The Prefect flow run is named after
the Sieve run id, which also names the MLflow parent run and ``runs/<run_id>``.
Deployments are ``sieve/pipeline``, ``sieve/evaluate`` and ``sieve/multistage``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, Literal

from prefect import Flow, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.deployments.runner import RunnerDeployment
from prefect.runtime import flow_run
from prefect.types.entrypoint import EntrypointType
from pydantic import Field

from estimators.registry import ESTIMATORS
from flows.evaluate import evaluate
from flows.multistage import multistage
from flows.pipeline import pipeline
from flows.runner import with_runner
from presentation import report
from storage.errors import BadInput
from storage.store import Store
from tasks.config import Config, load_config, validate
from tasks.multistage import preflight_multistage
from tasks.train import preflight

FLOW_NAME = "sieve"
MULTISTAGE_CONFIG = str(resources.files("configs").joinpath("multistage.yaml"))
EstimatorName = Literal[tuple(ESTIMATORS)]  # type: ignore[valid-type]

# Form field -> the config key it sets.
PIPELINE_FORM = {
    "epochs": "train.epochs", "estimators": "estimators", "noise": "data.noise",
    "model": "model.name", "prune_by": "prune.by", "prune_fraction": "prune.fraction",
    "prune_seeds": "prune.seeds", "seed": "seed",
}
EVALUATE_FORM = {
    "epochs": "train.epochs", "estimators": "estimators", "noise": "data.noise",
    "model": "model.name", "prune_by": "prune.by", "loo_samples": "evaluate.loo.samples",
    "lds_subsets": "evaluate.lds.subsets", "seed": "seed",
}
MULTISTAGE_FORM = {
    "finetune": "multistage.finetune", "hidden": "multistage.hidden", "noise": "data.noise",
    "prune_fraction": "prune.fraction", "prune_seeds": "prune.seeds",
    "validation_samples": "multistage.validation.samples", "seed": "seed",
}


def form_values(config: Config, form: dict[str, str]) -> dict[str, Any]:
    """The form's fields as ``config`` sets them (estimators by name)."""
    raw = config.model_dump(mode="json")
    values = {}
    for field, key in form.items():
        node: Any = raw
        for part in key.split("."):
            node = node[part]
        values[field] = [e["name"] for e in node] if key == "estimators" else node
    return values


def build_config(config: str | None, overrides: list[str], fields: dict[str, Any],
                 form: dict[str, str]) -> Config:
    """File ``config`` <- ``overrides`` <- form ``fields``, validated (BadInput). An estimator
    named both in the file and the form keeps the file's options."""
    base = load_config(config or None, overrides)
    known = {e.name for e in base.estimators}
    raw = base.model_dump(mode="json")
    for field, value in fields.items():
        key = form[field]
        if key == "estimators":
            value = [base.estimator(n).model_dump(mode="json") if n in known else {"name": n}
                     for n in value]
        *sections, leaf = key.split(".")
        node = raw
        for part in sections:
            if node.get(part) is None:  # e.g. no multistage section yet: its defaults
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return validate(raw)


def _new_run_id() -> str:
    return Store.new_run_id()


def _run(flow_fn: Flow, show: Callable, config: Config) -> str:
    """Run ``flow_fn`` as the CLI does, log its table and attach it as an artifact."""
    store = Store.default()
    run_id = flow_run.name
    started = time.perf_counter()
    summary = with_runner(flow_fn, config)(config=config, store=str(store.root), run_id=run_id,
                                           resume=False)
    with redirect_stdout(io.StringIO()) as out:
        show(summary, config, time.perf_counter() - started)
    table = out.getvalue()
    get_run_logger().info("run %s in %s\n%s", run_id, store.root, table)
    create_markdown_artifact(f"```\n{table}\n```", key="run-table",
                             description=f"Sieve run {run_id}")
    return run_id


def _single_stage(config: Config) -> Config:
    if config.multistage is not None:
        raise BadInput("this config has a multistage section: run the sieve/multistage deployment")
    return preflight(config)


_PIPELINE = form_values(load_config(), PIPELINE_FORM)
_EVALUATE = form_values(load_config(), EVALUATE_FORM)
_MULTISTAGE = form_values(load_config(MULTISTAGE_CONFIG), MULTISTAGE_FORM)
Model = Literal["logreg", "mlp", "cnn"]
Estimators = Annotated[list[EstimatorName], Field(min_length=1)]
Epochs = Annotated[int, Field(ge=1)]
Noise = Annotated[float, Field(ge=0, lt=1)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
Count = Annotated[int, Field(ge=1)]


@flow(name=FLOW_NAME, flow_run_name=_new_run_id, log_prints=True)
def pipeline_deployment(
    epochs: Epochs = _PIPELINE["epochs"],
    estimators: Estimators = _PIPELINE["estimators"],
    noise: Noise = _PIPELINE["noise"],
    model: Model = _PIPELINE["model"],
    prune_by: Estimators = _PIPELINE["prune_by"],
    prune_fraction: Fraction = _PIPELINE["prune_fraction"],
    prune_seeds: Count = _PIPELINE["prune_seeds"],
    seed: int = _PIPELINE["seed"],
    config: str | None = None,
    overrides: list[str] = (),
) -> str:
    """`sieve run` from the Prefect UI; returns the Sieve run id.

    Args:
        epochs: train.epochs
        estimators: estimators (options come from the config file)
        noise: data.noise, the fraction of training labels flipped
        model: model.name
        prune_by: prune.by, estimators among those above
        prune_fraction: prune.fraction, the share of training samples removed
        prune_seeds: prune.seeds, retrains per arm
        seed: seed
        config: a YAML config file (empty: the embedded default)
        overrides: key=value, as with --set, applied before the fields above
    """
    fields = {k: v for k, v in locals().items() if k in PIPELINE_FORM}
    built = _single_stage(build_config(config, list(overrides), fields, PIPELINE_FORM))
    return _run(pipeline, report.print_run_summary, built)


@flow(name=FLOW_NAME, flow_run_name=_new_run_id, log_prints=True)
def evaluate_deployment(
    epochs: Epochs = _EVALUATE["epochs"],
    estimators: Estimators = _EVALUATE["estimators"],
    noise: Noise = _EVALUATE["noise"],
    model: Model = _EVALUATE["model"],
    prune_by: Estimators = _EVALUATE["prune_by"],
    loo_samples: Annotated[int, Field(ge=3)] = _EVALUATE["loo_samples"],
    lds_subsets: Annotated[int, Field(ge=3)] = _EVALUATE["lds_subsets"],
    seed: int = _EVALUATE["seed"],
    config: str | None = None,
    overrides: list[str] = (),
) -> str:
    """`sieve evaluate` from the Prefect UI; returns the Sieve run id.

    Args:
        epochs: train.epochs
        estimators: estimators (options come from the config file)
        noise: data.noise, the fraction of training labels flipped
        model: model.name
        prune_by: prune.by, estimators among those above
        loo_samples: evaluate.loo.samples, training samples left out one at a time
        lds_subsets: evaluate.lds.subsets, random training subsets for LDS
        seed: seed
        config: a YAML config file (empty: the embedded default)
        overrides: key=value, as with --set, applied before the fields above
    """
    fields = {k: v for k, v in locals().items() if k in EVALUATE_FORM}
    built = _single_stage(build_config(config, list(overrides), fields, EVALUATE_FORM))
    return _run(evaluate, report.print_evaluation, built)


@flow(name=FLOW_NAME, flow_run_name=_new_run_id, log_prints=True)
def multistage_deployment(
    finetune: Literal["frozen", "proximal"] = _MULTISTAGE["finetune"],
    hidden: Count = _MULTISTAGE["hidden"],
    noise: Noise = _MULTISTAGE["noise"],
    prune_fraction: Fraction = _MULTISTAGE["prune_fraction"],
    prune_seeds: Count = _MULTISTAGE["prune_seeds"],
    validation_samples: Annotated[int, Field(ge=0)] = _MULTISTAGE["validation_samples"],
    seed: int = _MULTISTAGE["seed"],
    config: str | None = MULTISTAGE_CONFIG,
    overrides: list[str] = (),
) -> str:
    """`sieve run -c configs/multistage.yaml` from the Prefect UI; returns the Sieve run id.

    Args:
        finetune: multistage.finetune: frozen (only the new head) or proximal
        hidden: multistage.hidden, the embedding width
        noise: data.noise, the fraction of pretraining labels flipped
        prune_fraction: prune.fraction, the share of pretraining samples removed
        prune_seeds: prune.seeds, re-pretraining inits per arm
        validation_samples: multistage.validation.samples, leave-one-out refits (0: off)
        seed: seed
        config: a YAML config file with a multistage section
        overrides: key=value, as with --set, applied before the fields above
    """
    fields = {k: v for k, v in locals().items() if k in MULTISTAGE_FORM}
    built = build_config(config, list(overrides), fields, MULTISTAGE_FORM)
    preflight_multistage(built)
    return _run(multistage, report.print_multistage, built)


@dataclass(frozen=True)
class EntryFlow:
    """A served flow: its entry, its form, and whether its config has a multistage section
    (the config it falls back to when the served one is of the other kind)."""

    entry: Flow
    form: dict[str, str]
    multistage: bool = False
    fallback_config: str | None = None


# Deployment name -> what it serves. Serving another flow is one entry here.
ENTRY_FLOWS: dict[str, EntryFlow] = {
    "pipeline": EntryFlow(pipeline_deployment, PIPELINE_FORM),
    "evaluate": EntryFlow(evaluate_deployment, EVALUATE_FORM),
    "multistage": EntryFlow(multistage_deployment, MULTISTAGE_FORM, True, MULTISTAGE_CONFIG),
}


def deployments(config_path: str | None, overrides: list[str],
                schedules: dict[str, str]) -> list[RunnerDeployment]:
    """One deployment per entry flow. Runs read ``config_path`` (or, where it is of the other
    kind, the entry's fallback) with ``overrides``; the form's defaults are that config's
    values; ``schedules`` maps a deployment name to its cron. BadInput on a bad config."""
    out = []
    served_is_multistage = load_config(config_path, overrides).multistage is not None
    for name, served in ENTRY_FLOWS.items():
        path = config_path if served.multistage == served_is_multistage \
            else served.fallback_config
        defaults = form_values(load_config(path, overrides), served.form)
        parameters = {**defaults, "config": path, "overrides": list(overrides)}
        out.append(served.entry.to_deployment(
            name=name, cron=schedules.get(name), parameters=parameters,
            description=(served.entry.__doc__ or "").split("\n")[0],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return out
