"""What a run attributes, rebuilt from its store folder: samples, model factory, recipe."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from storage.store import RunPaths
from tasks.config import Config
from workloads.datasets import Samples, read_samples
from workloads.inputs import Inputs, model_inputs
from workloads.models import ModelFactory, model_factory
from workloads.task import attributed_factory, training_loss
from workloads.training import LossFn, Recipe


@dataclass(frozen=True)
class Workload:
    samples: Samples
    factory: ModelFactory  # the model as trained (every trainable parameter)
    attributed: ModelFactory  # the same with parameters outside model.modules frozen
    recipe: Recipe
    loss: LossFn  # the training loss of a batch (task.loss; cross-entropy by default)
    x: Inputs  # all samples: one (n, *shape) tensor, or name -> tensor (workloads.inputs)
    y: torch.Tensor  # (n,) int64, labels as trained on

    def rows(self, split: str) -> np.ndarray:
        return self.samples.indices(split)

    def test_labels(self) -> torch.Tensor:
        """Clean labels where known (test accuracy is measured against the truth)."""
        labels = self.samples.clean_label if self.samples.clean_label is not None else None
        return torch.from_numpy(labels) if labels is not None else self.y


def recipe(config: Config) -> Recipe:
    t = config.train
    return Recipe(
        epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr,
        momentum=t.momentum, weight_decay=t.weight_decay, schedule=t.schedule,
        step_epochs=t.step_epochs, gamma=t.gamma,
    )


def factory_for(config: Config, samples: Samples) -> ModelFactory:
    first = next(iter(samples.inputs.values()))
    return model_factory(
        config.model.name, config.model.factory, input_dim=int(np.prod(first.shape[1:])),
        input_shape=samples.input_shape, num_classes=samples.num_classes,
        hidden=config.model.hidden, input_shapes=samples.row_shapes(),
        trainable_layers=config.model.trainable_layers,
    )


@lru_cache(maxsize=8)
def _samples(path: Path, mtime_ns: int) -> Samples:
    return read_samples(path)


def load_workload(run: RunPaths, config: Config) -> Workload:
    """The run's workload from samples.parquet (cached per process)."""
    samples = _samples(run.samples, run.samples.stat().st_mtime_ns)
    factory = factory_for(config, samples)
    return Workload(
        samples=samples,
        factory=factory,
        attributed=attributed_factory(factory, config.model.modules),
        recipe=recipe(config),
        loss=training_loss(config.task.loss),
        x=model_inputs({name: torch.from_numpy(col) for name, col in samples.inputs.items()}),
        y=torch.from_numpy(samples.label),
    )
