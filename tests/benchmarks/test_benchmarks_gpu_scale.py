"""``python -m benchmarks.gpu_scale --device cpu --small`` runs in a fresh process without
Prefect importable and reports every stage of both models with positive rates."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NO_PREFECT = (
    "import sys, runpy; sys.modules['prefect'] = None; sys.argv = ['gpu_scale'] + sys.argv[1:];"
    " runpy.run_module('benchmarks.gpu_scale', run_name='__main__')"
)


def test_small_cpu_run_reports_every_stage(tmp_path):
    out = tmp_path / "gpu_scale.json"
    proc = subprocess.run(
        [sys.executable, "-c", NO_PREFECT, "--device", "cpu", "--small", "--with-ekfac",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["device"] == "cpu"
    assert [m["model"] for m in results["models"]] == ["cnn9", "resnet9"]
    for model in results["models"]:
        stages = [row["stage"] for row in model["rows"]]
        assert len(stages) == 8 and stages[0].startswith("forward + backward floor")
        assert any("TRAK factorized" in s for s in stages) and any("EK-FAC" in s for s in stages)
        for row in model["rows"]:
            assert row["seconds"] > 0 and row["samples_per_s"] > 0 and row["peak_gib"] > 0
        assert model["factorized_k"] > 0 and model["rows"][0]["share_of_floor"] == 1.0
