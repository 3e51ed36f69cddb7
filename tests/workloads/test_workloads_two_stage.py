"""Two-task digits: the split into pretraining and finetuning tasks, and pretraining noise."""

from __future__ import annotations

import numpy as np
import pytest

from storage.errors import BadInput
from workloads.datasets import load_digits
from workloads.two_stage import noisy_pretraining, split_tasks

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def test_tasks_are_relabeled_within_each_task():
    digits = load_digits(FRACTIONS, 0)
    samples, tasks = split_tasks(digits, [3, 1], [7, 9, 8])
    original = dict(zip(digits.sample_id.tolist(), digits.label.tolist(), strict=True))
    kept = np.array([original[i] for i in samples.sample_id])
    assert set(kept) == {1, 3, 7, 8, 9}
    assert (tasks == np.where(np.isin(kept, [1, 3]), "pretrain", "finetune")).all()
    expected = np.array([{3: 0, 1: 1, 7: 0, 9: 1, 8: 2}[c] for c in kept])
    assert (samples.label == expected).all() and (samples.clean_label == expected).all()


def test_noise_flips_only_pretraining_train_labels_within_task_a():
    samples, tasks = split_tasks(load_digits(FRACTIONS, 0), [0, 1, 2], [5, 6])
    noisy = noisy_pretraining(samples, tasks, 0.2, seed=0)
    flipped = noisy.corrupted
    pretraining = (tasks == "pretrain") & (samples.split == "train")
    assert flipped.sum() == round(0.2 * pretraining.sum())
    assert not flipped[~pretraining].any()
    assert (noisy.label[flipped] != samples.label[flipped]).all()
    assert set(noisy.label[flipped]) <= {0, 1, 2}


def test_a_class_without_samples_is_refused():
    with pytest.raises(BadInput, match="no samples of class"):
        split_tasks(load_digits(FRACTIONS, 0), [0, 1], [10, 11])
