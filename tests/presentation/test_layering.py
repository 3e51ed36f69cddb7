"""presentation/ sits below flows and tasks: none of its modules imports them at run time
(a ``TYPE_CHECKING`` import names a type only)."""

from __future__ import annotations

import ast
from pathlib import Path

import presentation


def _runtime_imports(tree: ast.Module) -> set[str]:
    """Top-level package names imported outside ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_presentation_imports_neither_flows_nor_tasks():
    folder = Path(presentation.__file__).parent
    modules = sorted(folder.glob("*.py"))
    assert len(modules) >= 9
    for path in modules:
        imported = _runtime_imports(ast.parse(path.read_text()))
        assert not imported & {"flows", "tasks"}, f"{path.name} imports {imported}"


def test_the_check_sees_a_runtime_import():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import tasks\n"
                     "def f():\n    from flows import cli\n")
    assert _runtime_imports(tree) == {"typing", "flows"}
