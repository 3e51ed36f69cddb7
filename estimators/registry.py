"""Estimators by name, in the order tables list them."""

from __future__ import annotations

import inspect
from typing import Any

from estimators.base import Estimator
from estimators.baselines import RandomScores, SelfLoss
from estimators.datainf import DataInf
from estimators.diffin import DiffIn, UnrolledSGD
from estimators.gex import GEX
from estimators.influence import ExactInfluence
from estimators.inner_product import CosineInnerProduct, InnerProduct
from estimators.ip_ensemble import IPEnsemble
from estimators.iterative_influence import (
    ArnoldiInfluence,
    ConjugateGradientInfluence,
    LissaInfluence,
)
from estimators.kfac import EKFACInfluence
from estimators.tracin import TracIn
from estimators.trak import TRAK

ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls
    for cls in (
        RandomScores,
        SelfLoss,
        InnerProduct,
        CosineInnerProduct,
        IPEnsemble,
        TracIn,
        ExactInfluence,
        ConjugateGradientInfluence,
        LissaInfluence,
        ArnoldiInfluence,
        EKFACInfluence,
        DataInf,
        TRAK,
        GEX,
        DiffIn,
        UnrolledSGD,
    )
}


def estimator_options(name: str) -> list[str]:
    """The keyword options the estimator ``name`` accepts."""
    params = inspect.signature(_lookup(name).__init__).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.name != "self" and p.kind in named]


def make_estimator(name: str, **options: Any) -> Estimator:
    """A configured estimator. KeyError for an unknown name, TypeError for an unknown option."""
    cls = _lookup(name)
    accepted = estimator_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"estimator {name!r} got unknown option(s) {unknown}; accepted: {accepted or 'none'}"
        )
    return cls(**options)


def _lookup(name: str) -> type[Estimator]:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise KeyError(
            f"unknown estimator {name!r}; known estimators: {', '.join(ESTIMATORS)}"
        ) from None
