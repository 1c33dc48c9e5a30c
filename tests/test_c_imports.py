"""The C backend's modules import each other without cycles, counting imports inside
functions too (a function-level import is how a cycle hides)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PKG = Path(__file__).resolve().parents[1] / "backends" / "c"


def intra_package_imports() -> dict[str, set[str]]:
    """``{module: modules of backends/c it imports anywhere in its body}``."""
    modules = {p.stem for p in PKG.glob("*.py")}
    out: dict[str, set[str]] = {}
    for path in PKG.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 1 and node.module:  # from .x import a
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(a.name for a in node.names)
            elif (node.module or "").startswith("graphopt.backends.c."):
                found.add(node.module.split(".")[3])
        out[path.stem] = {m for m in found if m in modules and m != path.stem}
    return out


def test_no_import_cycles_in_the_c_backend():
    imports = intra_package_imports()
    assert "kernels_float" in imports and "ctext" in imports  # the walk found the package
    g = nx.DiGraph([(a, b) for a, targets in imports.items() for b in targets])
    g.remove_nodes_from(["__init__"])  # the package re-exports; nothing imports it back
    assert list(nx.simple_cycles(g)) == []


def test_shared_helpers_sit_below_the_kernels():
    """``ctext`` and ``opbase`` are leaves the kernel modules build on: neither imports a
    kernel module (the activation helpers once made conv_fast and kernels_float a cycle)."""
    imports = intra_package_imports()
    assert imports["ctext"] == set()
    assert imports["opbase"] == {"ir"}
    assert "kernels_float" not in imports["conv_fast"]
    assert "kernels_float" not in imports["qdq_lower"]
