"""Safe defaults: every checkpoint load uses ``weights_only=True`` (and a pickle that would run
code is refused), servers listen on 127.0.0.1 unless told otherwise, and run ids cannot name
a folder outside the store. (The query sandbox: tests/storage/test_query_sandbox.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from flows.cli import _parser, main
from storage.checkpoints import load_state_dict
from storage.errors import BadInput
from storage.store import Store
from tasks.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for folder in ("flows", "tasks", "estimators", "workloads", "storage", "benchmarks")
           for p in sorted((ROOT / folder).rglob("*.py"))]


def _calls(path: Path, module: str, function: str) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == function
            and isinstance(node.func.value, ast.Name) and node.func.value.id == module]


def test_every_torch_load_is_weights_only():
    loads = {f"{p.relative_to(ROOT)}:{c.lineno}": c for p in SOURCES
             for c in _calls(p, "torch", "load")}
    assert loads, "found no torch.load call at all"
    unsafe = [where for where, call in loads.items()
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                         and k.value.value is True for k in call.keywords)]
    assert unsafe == []


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on the given path: code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    witness = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode(witness)}, evil)
    with pytest.raises(BadInput, match="unreadable"):
        load_state_dict(evil)
    assert not witness.exists()


def test_servers_listen_on_localhost_by_default():
    assert load_config(None, []).serve.host == "127.0.0.1"
    assert _parser().parse_args(["serve"]).host is None  # so serve.host applies
    wildcard = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in SOURCES
                for n in ast.walk(ast.parse(p.read_text()))
                if isinstance(n, ast.Constant) and n.value in ("0.0.0.0", "::")]
    assert wildcard == [], "a server binds every interface"


@pytest.mark.parametrize("run_id", ["../x", "../../etc", "/etc", "a/../../b", "..", ".hidden",
                                    "a/b", "", "x" * 65])
def test_run_ids_cannot_leave_the_store(run_id, tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(BadInput, match="invalid run id"):
        store.run(run_id)
    for command in (["run", "--resume", run_id], ["query", "select 1", "--run", run_id]):
        assert main([command[0], "--store", str(store.root), *command[1:]]) == 2
    assert not (tmp_path / "x").exists() and not store.root.exists()
