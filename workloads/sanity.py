"""The IP paper's synthetic sanity check (Yang et al., arXiv 2405.17490): 2-D data, linearly
separable or not, with a tight cluster of mislabeled training samples, so a plot of the decision
boundary shows at a glance whether an estimator finds them.

``linear``: two Gaussian blobs (sd 0.7) centred at (-1.5, 0) and (+1.5, 0). ``nonlinear``: two
interleaved half-moons (sklearn ``make_moons``, noise 0.12, scaled by 1.5). Then ``cluster``
extra training samples are drawn N(c, 0.15^2 I) around a point c deep inside class 0's region
((-1.5, 0), resp. the top of class 0's moon, (-0.75, 1.125)) and labelled 1: clean label 0,
``corrupted`` True. Everything is seeded; the base samples are split train/val/test as usual,
the cluster is all training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.datasets import make_moons

from workloads.datasets import Samples, assign_splits

Kind = Literal["linear", "nonlinear"]
_CENTRE = {"linear": (-1.5, 0.0), "nonlinear": (-0.75, 1.125)}


@dataclass(frozen=True)
class SanitySpec:
    kind: Kind = "nonlinear"
    n: int = 400  # base samples, split train/val/test
    cluster: int = 20  # clustered mislabeled training samples, added to the n
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _CENTRE:
            raise ValueError(f"unknown sanity kind {self.kind!r}; expected one of {list(_CENTRE)}")
        if self.n < 10 or self.cluster < 0:
            raise ValueError("sanity data needs n >= 10 and cluster >= 0")


def load_sanity(spec: SanitySpec, fractions: dict[str, float]) -> Samples:
    """n + cluster samples of 2 features (float32), labels 0/1; the cluster's labels flipped."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 2405]))
    if spec.kind == "linear":
        y = rng.integers(0, 2, spec.n)
        x = rng.normal(0.0, 0.7, (spec.n, 2)) + np.where(y[:, None] == 0, -1.5, 1.5) * [1, 0]
    else:
        x, y = make_moons(spec.n, noise=0.12, random_state=int(rng.integers(2**31)))
        x = 1.5 * (x - [0.5, 0.25])
    blob = rng.normal(_CENTRE[spec.kind], 0.15, (spec.cluster, 2))
    split = np.concatenate([assign_splits(spec.n, fractions, spec.seed),
                            np.full(spec.cluster, "train")])
    clean = np.concatenate([y, np.zeros(spec.cluster)]).astype(np.int64)
    label = np.concatenate([y, np.ones(spec.cluster)]).astype(np.int64)
    total = spec.n + spec.cluster
    return Samples(
        sample_id=np.arange(total, dtype=np.int64),
        inputs={"features": np.concatenate([x, blob]).astype(np.float32)},
        label=label,
        split=split.astype(str),
        num_classes=2,
        input_shape=(2,),
        clean_label=clean,
        corrupted=np.arange(total) >= spec.n,
    )
