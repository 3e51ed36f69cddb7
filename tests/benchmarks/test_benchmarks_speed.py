"""The speed benchmark's smoke mode runs and its measured table says Sieve's per-sample
gradients beat the naive autograd loop on the MLP (a measured ratio, so this can fail)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package: run from the repo root
    sys.path.insert(0, str(ROOT))
SIEVE = "Sieve per_sample_gradients (layerwise closed form)"
NAIVE = "naive loop (autograd.grad per sample)"


def _table_rows(text: str, title: str) -> dict[str, list[str]]:
    """Cells of each body row of the rich table whose title line starts with ``title``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            if cells[0]:  # not the continuation line of a wrapped cell
                rows.setdefault(cells[0], cells)
    return rows


def _rate(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_quick_benchmark_table(tmp_path):
    """Sections 1 and 3 of ``--quick`` (section 2 is covered in-process below, cheaper than its
    fresh process per stage); 5 timed passes so one descheduled pass can't decide a median."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--quick", "--sections", "1,3",
         "--repeats", "5", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout

    mlp = _table_rows(text, "1. per-sample gradients: mlp")
    cnn = _table_rows(text, "1. per-sample gradients: small_cnn")
    for table in (mlp, cnn):
        assert SIEVE in table and NAIVE in table, sorted(table)
        assert _rate(table[SIEVE][1]) > 0 and _rate(table[NAIVE][1]) > 0
        assert table[NAIVE][2].endswith("×") and table[SIEVE][3].endswith("×")
    sieve, naive = _rate(mlp[SIEVE][1]), _rate(mlp[NAIVE][1])
    assert sieve > naive, f"Sieve {sieve:.0f}/s did not beat the naive loop {naive:.0f}/s"
    assert float(mlp[SIEVE][3].rstrip("×")) > 1.0

    # every peer row is either measured or says why it failed
    for table in (mlp, cnn):
        for cells in table.values():
            assert cells[1] == "failed" or _rate(cells[1]) > 0, cells

    reads = _table_rows(text, "3. gradient shard reads")
    sieve_read = next(v for k, v in reads.items() if k.startswith("Sieve read_gradient_shard"))
    assert float(sieve_read[1]) > 0 and sieve_read[7] == "yes"

    results = json.loads(out.read_text())
    rows = {(r["model"], r["method"]): r for r in results["per_sample"]["rows"]}
    assert rows[("mlp 64-64-10", SIEVE)]["max_rel_diff"] == 0.0
    assert rows[("mlp 64-64-10", NAIVE)]["max_rel_diff"] < 1e-4
    assert len(rows[("mlp 64-64-10", SIEVE)]["seconds"]) == 5


def test_pipeline_stages_in_process(tmp_path):
    """Section 2's stages, run in this process on a 1-epoch default workload: each reports
    its seconds and peak RSS, and the query finds the 100 most harmful by TracIn."""
    from benchmarks.stages import run_stage

    run_dir = tmp_path / "run"
    opts = {"overrides": ["train.epochs=1", "train.checkpoints=1"]}
    results = {s: run_stage(s, run_dir, opts)
               for s in ("data", "train", "gradients", "score:tracin", "score:loss", "query")}
    for stage, result in results.items():
        assert "failed" not in result, (stage, result)
        assert result["seconds"] > 0 and result["peak_rss_mib"] >= result["rss_start_mib"] > 0
    assert results["data"]["split_sizes"]["train"] == 1078
    assert results["gradients"]["samples"] == 1078 + 359
    assert results["query"]["rows"] == 100


def test_pipeline_stage_worker_reports_a_failure(tmp_path):
    """A stage that cannot run (no samples yet) is reported as failed, not raised."""
    from benchmarks.stages import run_stage

    result = run_stage("score:tracin", tmp_path / "run", {})
    assert "failed" in result and "seconds" not in result
