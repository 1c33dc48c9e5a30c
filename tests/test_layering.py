"""The house plan, checked: the core imports no pass and no backend (only ``graphopt/app``
may), there are no import cycles, and no module grows past 600 lines unless its docstring
says why."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"graphopt": ROOT / "graphopt", "graphopt.passes": ROOT / "passes"}
PACKAGES["graphopt.backends"] = ROOT / "backends"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # if TYPE_CHECKING: ...
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("graphopt")}


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def test_the_core_imports_no_pass_and_no_backend():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        if not name.startswith("graphopt.") or name.startswith(
            ("graphopt.passes", "graphopt.backends", "graphopt.app")
        ):
            continue
        for imp in _imports(name, path, top_level_only=False):
            if imp.startswith(("graphopt.passes", "graphopt.backends")):
                bad.append(f"{name} imports {imp}")
    assert not bad, bad


def test_passes_do_not_reach_up_to_the_manager():
    """Nested pipelines go through ``ctx.run_nested``; the registry finds passes, never the
    other way round."""
    bad = [
        f"{name} imports {imp}"
        for name, path in _modules().items()
        if name.startswith("graphopt.passes")
        for imp in _imports(name, path, top_level_only=False)
        if imp.startswith(("graphopt.manager", "graphopt.registry", "graphopt.app"))
    ]
    assert not bad, bad


def test_no_import_cycles_at_module_level():
    modules = _modules()
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        for imp in _imports(name, path, top_level_only=True):
            target = _resolve(imp, modules)
            if target and target != name and not name.startswith(target + "."):
                g.add_edge(name, target)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles[:5]


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_over_600_lines_without_a_reason(name):
    path = _modules()[name]
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "lines because" in doc, f"{path.relative_to(ROOT)} has {lines} lines"
