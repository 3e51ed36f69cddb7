"""benchmarks.damping_convex at a tiny size: every estimator x damping row is printed with finite
figures, the undamped exact influence function ranks leave-one-out right on the converged
model, and bad sizes exit 2."""

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package: run from the repo root
    sys.path.insert(0, str(ROOT))

from benchmarks import damping_convex  # noqa: E402


def _rows(text: str) -> dict[tuple[str, str], list[str]]:
    """(estimator, damping) -> the other cells of the printed markdown table."""
    lines = [line for line in text.splitlines() if line.startswith("| if_")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {(c[0], c[1].split(" ")[0]): c[2:] for c in cells}


def test_tiny_run_prints_finite_rows(capsys):
    code = damping_convex.main(["--subsets", "6", "--targets", "4", "--removals", "5",
                                "--dampings", "default,0"])
    assert code == 0
    out = capsys.readouterr().out
    assert "max |grad| at the fits" in out
    rows = _rows(out)
    assert set(rows) == {(e, d) for e in ("if_exact", "if_cg", "if_arnoldi")
                         for d in ("default", "0")}
    for (name, damping), (lds_cell, pearson, spearman, seconds, vs_exact) in rows.items():
        mean, ci = lds_cell.split(" [")
        low, high = (float(v) for v in ci.rstrip("]").split(", "))
        values = [float(mean), low, high, float(pearson), float(spearman), float(seconds),
                  float(vs_exact)]
        assert all(math.isfinite(v) for v in values), (name, damping, values)
        assert low <= float(mean) <= high and float(seconds) > 0
    assert float(rows[("if_exact", "0")][4]) == 0.0  # the reference of the last column
    # damping 0 is the exact influence function of a converged convex model
    assert float(rows[("if_exact", "0")][2]) >= 0.9


def test_too_few_subsets_exit_2():
    with pytest.raises(SystemExit) as exit_info:
        damping_convex.main(["--subsets", "2"])
    assert exit_info.value.code == 2
