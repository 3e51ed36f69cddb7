"""Reading a run's outputs back in the flow tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def scores_by_estimator(run_dir: Path) -> dict[str, np.ndarray]:
    """Each estimator's scores (partition directory name -> scores in sample_id order)."""
    out = {}
    for path in sorted((Path(run_dir) / "scores").rglob("part-0.parquet")):
        table = pq.read_table(path).sort_by("sample_id")
        out[path.parent.parent.name] = table["score"].to_numpy()
    return out
