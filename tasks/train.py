"""Stage 1: the run's samples, then training with checkpoint capture (or the user's checkpoints)."""

from __future__ import annotations

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from estimators.per_sample import parameter_count
from storage.atomic import write_parquet_atomic
from storage.checkpoints import (
    CheckpointRecord,
    file_sha256,
    load_state_dict,
    read_checkpoint_index,
    save_checkpoint,
    verify_checkpoints,
    write_checkpoint_index,
)
from storage.errors import BadInput
from storage.store import RunPaths
from storage.tracking import Tracking
from tasks.config import Config, screen_estimators
from tasks.progress import StageProgress
from tasks.stage import stage
from tasks.utility import check_utility, measurement
from tasks.workload import Workload, factory_for, load_workload
from workloads.datasets import Samples, load_digits, load_parquet, samples_table
from workloads.german_credit import load_german_credit
from workloads.inputs import batch_inputs, call_model, model_inputs, take
from workloads.mnist import load_mnist5k
from workloads.models import seeded_model
from workloads.noise import flip_labels
from workloads.sanity import SanitySpec, load_sanity
from workloads.synthetic import SyntheticSpec, load_synthetic
from workloads.task import attributed_names, training_loss
from workloads.training import CheckpointEvent, accuracy, train
from workloads.tweets import load_tweets


def load_samples(config: Config) -> Samples:
    """The configured dataset with label noise applied to the train split."""
    d = config.data
    fractions = d.splits.model_dump()
    if d.name == "digits":
        samples = load_digits(fractions, config.seed)
    elif d.name == "mnist5k":
        samples = load_mnist5k(fractions, config.seed)
    elif d.name == "german_credit":
        samples = load_german_credit(fractions, config.seed)
    elif d.name == "tweets":
        samples = load_tweets(d.tweets.n, d.text.tokenizer, d.text.max_length, fractions,
                              config.seed)
    elif d.name == "synthetic":
        spec = SyntheticSpec(d.synthetic.n, d.synthetic.input_dim, d.synthetic.classes,
                             config.seed)
        samples = load_synthetic(spec, fractions)
    elif d.name == "sanity":
        samples = load_sanity(SanitySpec(d.sanity.kind, d.sanity.n, d.sanity.cluster,
                                         config.seed), fractions)
    else:
        samples = load_parquet(
            d.path, label_column=d.label_column, feature_columns=d.feature_columns,
            group_column=d.group_column, fractions=fractions, seed=config.seed,
            shapes={name: tuple(dims) for name, dims in d.shapes.items()},
        )
    for split in ("train", "val", "test"):
        if len(samples.indices(split)) == 0:
            raise BadInput(f"data: the {split} split is empty")
    if d.noise > 0:
        noisy, corrupted = flip_labels(
            samples.label, d.noise, samples.num_classes, samples.indices("train"), config.seed
        )
        clean = samples.clean_label if samples.clean_label is not None else samples.label
        samples = samples.with_labels(noisy, clean, corrupted)
    return samples


def preflight(config: Config) -> Config:
    """Fail fast, before any flow starts, on data or model problems (raises BadInput); returns
    the config to run, without the ``skip_if_unable`` estimators that cannot run on this model
    (``screen_estimators``: they are listed under ``skipped``)."""
    samples = load_samples(config)
    check_utility(config, samples)
    model = factory_for(config, samples)()
    attributed = set(attributed_names(model, config.model.modules))
    training_loss(config.task.loss)
    measurement(config)
    out = probe(model, samples)
    if out.ndim != 2 or out.shape[1] < samples.num_classes:
        raise BadInput(
            f"model output has shape {tuple(out.shape)}; expected (n, {samples.num_classes}) logits"
        )
    if isinstance(config.train.checkpoints, list):
        for ckpt in config.train.checkpoints:
            _load_into(model, ckpt.path)
    size = sum(p.numel() for name, p in model.named_parameters() if name in attributed)
    return screen_estimators(config, size)  # estimators see the attributed parameters only


def probe(model: torch.nn.Module, samples: Samples) -> torch.Tensor:
    """The model's output on the first two train rows; BadInput (with the input shapes) when
    the model can't take them, e.g. an image shape its first layer does not accept."""
    rows = samples.indices("train")[:2]
    batch = model_inputs(batch_inputs(samples.inputs, rows))
    try:
        with torch.no_grad():
            return call_model(model.eval(), batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shapes = ", ".join(f"{n} {s}" for n, s in samples.row_shapes().items())
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInput(f"the model does not accept the inputs (rows of {shapes}): "
                       f"{first}") from None


def _load_into(model: torch.nn.Module, path: str) -> None:
    state = load_state_dict(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise BadInput(f"checkpoint {path} does not match the model: {first[0].strip()}") from None


@task(name="prepare-samples", cache_policy=NO_CACHE)
def prepare_samples(run: RunPaths, config: Config) -> int:
    """Write samples.parquet once (a resumed run keeps the existing file)."""
    if not run.samples.exists():
        write_parquet_atomic(samples_table(load_samples(config)), run.samples)
    return int(run.samples.stat().st_size)


@task(name="train", cache_policy=NO_CACHE)
def train_stage(run: RunPaths, config: Config, tracking: Tracking) -> list[CheckpointRecord]:
    """Train on the train split, capturing checkpoints; returns the checkpoint index."""
    log = get_run_logger()
    if run.checkpoint_index.exists():
        records = read_checkpoint_index(run.checkpoints_dir)
        verify_checkpoints(records)
        log.info("train: reusing %d checkpoints already in %s", len(records), run.checkpoints_dir)
        return records
    work = load_workload(run, config)
    with stage(run, tracking, "train") as rec:
        rec.params({"model": config.model.factory or config.model.name, **work.recipe.__dict__,
                    "seed": config.seed, "n_train": len(work.rows("train"))})
        if isinstance(config.train.checkpoints, list):
            records = _register_user_checkpoints(config, work)
            log.info("train: attributing %d given checkpoints, no training", len(records))
        else:
            epochs = StageProgress("train", config.train.models * work.recipe.epochs, "epochs",
                                   log)
            records = [r for member in range(config.train.models)
                       for r in _train_and_capture(run, config, work, rec, epochs, member)]
        write_checkpoint_index(run.checkpoints_dir, records)
        rec.metric("trainable_parameters", parameter_count(work.factory()))
        rec.metric("attributed_parameters", parameter_count(work.attributed()))
        last = [r for r in records if r.model == 0][-1]
        final = work.factory()
        final.load_state_dict(load_state_dict(last.path, last.sha256))
        for split in ("train", "val", "test"):
            idx = work.rows(split)
            labels = work.test_labels() if split == "test" else work.y
            rec.metric(f"{split}_accuracy", accuracy(final, take(work.x, idx), labels[idx]))
    return records


def member_seed(seed: int, member: int) -> int:
    """The training seed of ensemble member ``member`` (0 is the attributed model)."""
    return seed + 1000 * member


def _train_and_capture(run, config, work: Workload, rec, epochs: StageProgress, member: int):
    """Train one model (``member`` 0 is the attributed one, 1.. independent ensemble members)
    and save its checkpoints (members > 0 under ``checkpoints/model=<m>/``)."""
    idx = work.rows("train")
    seed = member_seed(config.seed, member)
    directory = run.checkpoints_dir / (f"model={member}" if member else "")
    model = seeded_model(work.factory, seed)
    records: list[CheckpointRecord] = []

    def capture(event: CheckpointEvent) -> None:
        path, sha = save_checkpoint(directory, event.step, event.state_dict)
        records.append(CheckpointRecord(event.index, event.step, event.epoch, event.lr,
                                        str(path), sha, event.step_lr, member))

    def progress(epoch: int, loss: float) -> None:
        epochs.advance(note=f"model {member + 1}/{config.train.models}, epoch {epoch}, "
                            f"loss {loss:.4f}")

    losses = train(model, take(work.x, idx), work.y[idx], work.recipe, seed,
                   checkpoints=config.train.checkpoints, on_checkpoint=capture, on_epoch=progress,
                   loss_fn=work.loss)
    if member == 0:
        for step, loss in enumerate(losses):
            rec.metric("loss", loss, step=step)
    rec.metric("final_loss", float(np.mean(losses[-10:])), seed=seed)
    return records


def _register_user_checkpoints(config: Config, work: Workload) -> list[CheckpointRecord]:
    model = work.factory()
    records = []
    for i, ckpt in enumerate(config.train.checkpoints):
        _load_into(model, ckpt.path)
        step = ckpt.step if ckpt.step is not None else i
        records.append(CheckpointRecord(i, step, float("nan"), ckpt.lr, ckpt.path,
                                        file_sha256(ckpt.path)))
    return records
