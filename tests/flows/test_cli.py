"""Bad input gets a one-line error naming the problem and exit code 2, before anything is
written to the store."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flows.cli import main


def _files(root):
    return sorted(p for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def bad_inputs(tmp_path):
    config = tmp_path / "unknown-key.yaml"
    config.write_text("seed: 0\ntrian:\n  epochs: 3\n")
    table = pa.table({"a": [0.1, 0.2, 0.3], "label": [0, 1, -1]})
    pq.write_table(table, tmp_path / "negative-labels.parquet")
    torch.save({"weight": torch.zeros(3, 3)}, tmp_path / "other-model.pt")
    return {
        "unknown config key": (["-c", str(config)], "trian: unknown key"),
        "wrong type": (["--set", "train.epochs=abc"], "train.epochs"),
        "missing data file": (["--set", "data.path=/no/such/file.parquet"], "not found"),
        "factory that doesn't import": (
            ["--set", "model.factory=no_such_package.models:make"], "cannot import"),
        "missing config file": (["-c", str(tmp_path / "missing.yaml")], "config file not found"),
        "label out of range": (
            ["--set", f"data.path={tmp_path / 'negative-labels.parquet'}"], "negative labels"),
        "checkpoint not matching the model": (
            ["--set", f"train.checkpoints=[{{path: {tmp_path / 'other-model.pt'}, lr: 0.1}}]"],
            "does not match the model"),
        "unknown estimator": (["--set", "estimators=[ip,magic]"], "unknown estimator"),
        "resume of a run that doesn't exist": (["--resume", "nope"], "no run nope"),
    }


CASES = [
    "unknown config key", "wrong type", "missing data file", "factory that doesn't import",
    "missing config file", "label out of range", "checkpoint not matching the model",
    "unknown estimator", "resume of a run that doesn't exist",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_run_input_exits_2_with_one_line(case, bad_inputs, tmp_path, capsys):
    args, expected = bad_inputs[case]
    store = tmp_path / "store"
    assert main(["run", "--store", str(store), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert expected in err, err
    assert _files(store) == []


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("insert into scores values ('x', 'y', 1, 2.0, 0.0)", "read-only"),
        ("copy scores to '/tmp/out.csv'", "read-only"),
        ("select nope from samples", "nope"),
    ],
)
def test_bad_query_exits_2(sql, expected, tmp_path, capsys):
    store = tmp_path / "store"
    (store / "runs" / "r1").mkdir(parents=True)
    assert main(["query", "--store", str(store), "--run", "r1", sql]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err


def test_query_without_runs_exits_2(tmp_path, capsys):
    assert main(["query", "--store", str(tmp_path), "select 1"]) == 2
    assert "no runs" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--store", str(tmp_path),
         "--set", "train.epochs=abc"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "train.epochs" in result.stderr



def test_usage_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--no-such-flag" in err


def test_store_may_come_before_the_command(tmp_path, capsys):
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    assert main(["--store", str(tmp_path), "runs"]) == 0
    assert "r1" in capsys.readouterr().out


def test_broken_config_of_a_resumed_run_exits_2(tmp_path, capsys):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: [unclosed\n")
    assert main(["run", "--store", str(tmp_path), "--resume", "r1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML" in err and "\n" not in err
