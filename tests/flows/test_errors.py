"""Every bad input listed in docs/errors.md, run as written there: exit code 2, one stderr line
``error: ...`` containing the documented text, and the store unchanged, byte for byte.

The table in docs/errors.md is the single source: each of its rows is one test case here.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.tiny import run_args, write_data
from flows.cli import main
from storage.store import Store

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER = re.compile(r"<([A-Za-z0-9._-]+)>")
RGB_MODEL = """
from torch import nn

def make(num_classes):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))
"""


def _table_rows(doc: Path) -> list[dict[str, str]]:
    """The rows of the table in ``doc`` whose header starts with ``| kind |``, keyed by each
    header cell's first word (kind, bad, command, error, exit)."""
    rows, header = [], None
    for line in doc.read_text().splitlines():
        if not line.startswith("|"):
            header = None if rows else header
            continue
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split(" | ")]
        if header is None:
            header = [c.split(" ")[0] for c in cells] if cells[0] == "kind" else None
        elif not set(line) <= set("|-: "):  # not the |---| line
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


CASES = _table_rows(ROOT / "docs" / "errors.md")


def _case_id(case: dict[str, str]) -> str:
    return f"{case['kind']}: {case['bad']}"


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden ones included), by relative path; folders
    map to ``dir``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The files and the store the commands name: placeholder -> its text."""
    files = tmp_path_factory.mktemp("inputs")
    (files / "unknown-key.yaml").write_text("seed: 0\ntrian:\n  epochs: 3\n")
    (files / "broken.yaml").write_text("seed: [unclosed\n")
    (files / "list.yaml").write_text("- seed\n- 0\n")
    write_data(files / "tiny.parquet")
    pq.write_table(pa.table({"a": [0.1, 0.2, 0.3], "label": [0, 1, -1]}),
                   files / "negative-labels.parquet")
    (files / "garbage.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    pq.write_table(pa.table({"image": [[[0.1, 0.2]], [[0.3]], [[0.4, 0.5]]], "label": [0, 1, 0]}),
                   files / "ragged.parquet")
    pq.write_table(pa.table({"image": [[[[0.5] * 4] * 4]] * 30, "label": [0, 1, 2] * 10}),
                   files / "images.parquet")
    (files / "rgb_models.py").write_text(RGB_MODEL)
    sys.path.insert(0, str(files))
    torch.save({"weight": torch.zeros(3, 3)}, files / "other-model.pt")
    (files / "garbage.pt").write_bytes(b"not a checkpoint")

    store = Store(tmp_path_factory.mktemp("store"))
    assert main(run_args(store.root, files / "tiny.parquet")) == 0
    run = store.latest_run()
    damaged = store.runs_dir / "damaged-run"
    shutil.copytree(run.dir, damaged)
    checkpoint = sorted((damaged / "checkpoints").glob("step-*.pt"))[0]
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    (store.runs_dir / "broken-run").mkdir()
    (store.runs_dir / "broken-run" / "config.yaml").write_text("seed: [unclosed\n")

    names = {p.name: str(p) for p in files.iterdir()}
    names |= {n: str(files / n) for n in ("missing.yaml", "missing.parquet", "missing.pt",
                                                 "missing-tokenizer")}
    yield names | {"store": str(store.root), "run": run.run_id, "damaged-run": "damaged-run",
                   "broken-run": "broken-run"}
    sys.path.remove(str(files))


def _fill(text: str, world: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: world[m.group(1)], text)


def test_the_table_lists_at_least_25_bad_inputs():
    assert len(CASES) >= 25
    assert {c["kind"] for c in CASES} >= {"config", "data", "model", "checkpoint", "query"}
    assert all(c["exit"] == "2" for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input_is_one_line_exit_2_and_leaves_the_store(case, world, capsys):
    command, *rest = shlex.split(_fill(case["command"], world))
    store = Path(world["store"])
    before = _tree(store)
    capsys.readouterr()
    try:
        code = main([command, "--store", str(store), *rest])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == int(case["exit"]), err
    assert err.startswith("error: ") and "\n" not in err, err
    assert _fill(case["error"], world) in err
    assert _tree(store) == before, "the store changed"
