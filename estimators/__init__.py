"""Training-data attribution estimators (plain torch).

Sign convention: ``score > 0`` = the training sample is beneficial to the target (removing it is
predicted to raise the summed target loss); ``suspicion`` is sign-free, higher = more suspect.
"""

from estimators.base import (
    Attribution,
    Checkpoint,
    Estimator,
    GradientSource,
    Needs,
    PairwiseStream,
    PairwiseVectors,
    ScoringContext,
)
from estimators.gradient_source import InMemoryGradients
from estimators.per_sample import per_sample_gradients
from estimators.registry import ESTIMATORS, make_estimator

__all__ = [
    "ESTIMATORS",
    "Attribution",
    "Checkpoint",
    "Estimator",
    "GradientSource",
    "InMemoryGradients",
    "Needs",
    "PairwiseStream",
    "PairwiseVectors",
    "ScoringContext",
    "make_estimator",
    "per_sample_gradients",
]
