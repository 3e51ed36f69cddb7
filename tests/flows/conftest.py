"""Flow-test helpers: the small config (``SMALL``) that tests/conftest.py's shared ``small_run``
uses, ``--set`` arguments, and one real ``sieve serve`` for the serve and browser tests."""

from __future__ import annotations

import pytest

SMALL = [
    "train.epochs=6",
    "train.checkpoints=3",
    "prune.seeds=2",
    "gradients.shard_size=32",
]


# A run small enough to repeat per runner or store: 2 checkpoints, 256-row shards, k = 64.
SHARDED_RUN = [
    "train.epochs=3",
    "train.checkpoints=2",
    "estimators=[ip, tracin]",
    "prune.by=tracin",
    "prune.seeds=1",
    "gradients.shard_size=256",
    "gradients.projection=64",
]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """One real ``sieve serve`` (tiny config, pipeline every minute) for the serve and browser
    tests; stopping it with Ctrl-C is checked at the end of the session."""
    from tests.flows.serving import serve_process

    with serve_process(tmp_path_factory.mktemp("served")) as running:
        yield running
