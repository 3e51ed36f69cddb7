"""Label-confidence analysis, for data whose samples carry an annotator ``confidence`` column
(``data.name: tweets``): are the most harmful training samples enriched in low-confidence
labels, and does removing them and training again beat removing random samples?

Low confidence: ``confidence < LOW_CONFIDENCE`` (0.7: a third or more of the annotators'
weighted votes went to another label). Per estimator, the most harmful ``prune.fraction`` of the
train split are its lowest scores (the prune stage's order: score ascending, ties to the larger
sample id). ``enrichment`` = their low-confidence rate / the train split's (the base rate);
``p_value`` = P(at least that many low-confidence samples in a random draw of the same size),
hypergeometric. Retrained test accuracy per arm: mean and sd over seeds (sd with ddof=1).
Written to ``runs/<id>/confidence.json``, logged, and recorded as metrics of stage
``confidence``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from scipy.stats import hypergeom

from storage.atomic import read_parquet_schema, read_parquet_table, write_text_atomic
from storage.store import RunPaths
from storage.tracking import Tracking
from tasks.config import Config
from tasks.prune import prune_count
from tasks.score import target_name
from tasks.stage import stage

LOW_CONFIDENCE = 0.7
"""A label is low-confidence below this annotator confidence."""


@dataclass(frozen=True)
class Enrichment:
    """Low-confidence labels among the ``harmful`` most harmful train samples of one estimator."""

    harmful: int
    low_in_harmful: int
    rate_harmful: float
    base_rate: float
    enrichment: float | None  # None when the base rate is 0
    p_value: float


def enrichment(score: np.ndarray, sample_id: np.ndarray, low: np.ndarray,
               count: int) -> Enrichment:
    """Enrichment of ``low`` (bool, aligned with ``score``) among the ``count`` lowest scores
    (ties to the larger sample id), against the base rate of ``low`` over all rows."""
    order = np.lexsort((-sample_id, score))[:count]
    hits = int(low[order].sum())
    base = float(low.mean())
    rate = hits / count
    p = float(hypergeom.sf(hits - 1, len(low), int(low.sum()), count))
    return Enrichment(count, hits, rate, base, rate / base if base > 0 else None, p)


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def has_confidence(run: RunPaths) -> bool:
    return "confidence" in read_parquet_schema(run.samples).names


@task(name="confidence", cache_policy=NO_CACHE)
def confidence_stage(
    run: RunPaths, config: Config, tracking: Tracking, accuracy: dict[str, list[float]]
) -> dict | None:
    """The analysis above as a dict (also ``runs/<id>/confidence.json``); None when the samples
    have no confidence column. ``accuracy``: {arm: test accuracy per seed} of the retrain
    stage."""
    if not has_confidence(run):
        return None
    log = get_run_logger()
    samples = read_parquet_table(run.samples, columns=["sample_id", "split", "confidence"])
    train = samples.filter(pc.equal(samples["split"], "train"))
    conf = dict(zip(train["sample_id"].to_pylist(), train["confidence"].to_pylist(),
                    strict=True))
    count = prune_count(config, len(conf))
    result: dict = {"low_confidence_below": LOW_CONFIDENCE, "fraction": config.prune.fraction,
                    "estimators": {}, "accuracy": {}}
    with stage(run, tracking, "confidence") as rec:
        for spec in config.estimators:
            table = read_parquet_table(run.scores_dir(spec.name, target_name(config))
                                       / "part-0.parquet", columns=["sample_id", "score"])
            ids = table["sample_id"].to_numpy()
            low = np.array([conf[i] < LOW_CONFIDENCE for i in ids.tolist()])
            e = enrichment(table["score"].to_numpy(), ids, low, count)
            result["estimators"][spec.name] = asdict(e)
            rec.metric("low_confidence_rate", e.rate_harmful, estimator=spec.name)
            if e.enrichment is not None:
                rec.metric("low_confidence_enrichment", e.enrichment, estimator=spec.name)
            log.info("confidence: %s: %d/%d of the most harmful have confidence < %.2f "
                     "(%.1f%% vs base rate %.1f%%, p=%.2g)", spec.name, e.low_in_harmful,
                     e.harmful, LOW_CONFIDENCE, 100 * e.rate_harmful, 100 * e.base_rate,
                     e.p_value)
        for arm, values in accuracy.items():
            mean, sd = mean_sd(values)
            result["accuracy"][arm] = {"mean": mean, "sd": sd, "seeds": len(values)}
            log.info("confidence: test accuracy %s %.2f%% (sd %s, %d seeds, ddof=1)", arm,
                     100 * mean, "–" if sd is None else f"{100 * sd:.2f}", len(values))
        path = run.dir / "confidence.json"
        write_text_atomic(json.dumps(result, indent=2, allow_nan=False), path)
        rec.artifact(path)
    return result
