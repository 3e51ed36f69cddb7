"""Issue 15's external MLP: 9,610 trainable parameters, and its fixed first layer standardizes
the train rows of the split its overrides give (mean 0, std 1 per non-constant feature)."""

import numpy as np
import torch

from benchmarks.external_mlp import OVERRIDES, make
from tasks.config import load_config
from tasks.train import load_samples


def test_standardizes_the_train_split_with_fixed_buffers():
    config = load_config(None, OVERRIDES)
    samples = load_samples(config)
    assert [len(samples.indices(s)) for s in ("train", "val", "test")] == [1199, 298, 300]
    model = make(10)
    assert sum(p.numel() for p in model.parameters()) == 9610
    assert {name for name, _ in model.named_buffers()} == {"0.mean", "0.std"}
    z = model[0](torch.as_tensor(samples.x[samples.indices("train")])).double().numpy()
    varying = z.std(axis=0) > 0
    assert varying.sum() == 61
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0)[varying], 1, atol=1e-5)
    assert model(torch.zeros(2, 64)).shape == (2, 10)
