"""Fresh-seed LDS retrains: every subset gets its own seeds, none shared with the attributed
model or the fixed-seed protocol."""

from __future__ import annotations

from tasks.config import load_config
from tasks.evaluation import fresh_seeds


def test_fresh_seeds_are_per_subset_deterministic_and_never_the_models() -> None:
    config = load_config(None, ["evaluate.lds.fresh_seeds=3", "seed=5"])
    seeds = [fresh_seeds(config, j) for j in range(20)]
    assert all(len(s) == 3 for s in seeds)
    flat = [s for subset in seeds for s in subset]
    assert len(set(flat)) == len(flat)  # distinct across subsets and within each
    fixed = {config.seed + k for k in range(config.evaluate.lds.seeds)}
    assert not fixed & set(flat)
    assert fresh_seeds(config, 7) == seeds[7]
    assert all(0 <= s < 2**31 for s in flat)
    off = load_config(None, ["seed=5"])
    assert fresh_seeds(off, 0) == []
