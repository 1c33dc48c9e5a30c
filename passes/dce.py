"""``dce``: remove dead nodes, then the submodules and parameters no node uses any more.

A node is dead when nothing uses its value and it has no side effect: FX's ``Node.is_impure``
decides side effects, and on top of that every in-place operation is kept
(``x.add_(1)``, ``torch.relu_(x)``, ``operator.iadd``, ``inplace=True`` functions and modules),
since it mutates a tensor that is used even when its own result is not.

Afterwards every submodule no ``call_module``/``get_attr`` node reaches is deleted, and so is
every parameter or buffer, at any depth, that no ``get_attr`` reads and no called module owns
(a traced-through container keeps its used children but loses a dead tensor of its own).
"""

from __future__ import annotations

import operator

import torch.fx as fx

from graphopt.graph import Graph
from graphopt.pass_api import Pass, PassContext, PassResult

_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.imatmul,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.setitem,
}


def _inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def is_impure(node: fx.Node) -> bool:
    """FX's notion of a side effect, plus every in-place operation."""
    if node.is_impure():
        return True
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return _inplace_name(str(node.target))
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        return _inplace_name(getattr(node.target, "__name__", ""))
    if node.op == "call_module":
        try:
            mod = node.graph.owning_module.get_submodule(str(node.target))
        except AttributeError:
            return True
        return getattr(mod, "inplace", False) is True
    return False


def _eliminate_dead_code(g: fx.Graph) -> None:
    """Erase, last to first, every node without users that is not impure (as FX's
    ``eliminate_dead_code``, with :func:`is_impure`, on every torch version)."""
    for node in reversed(list(g.nodes)):
        if node.op not in ("placeholder", "output") and not node.users and not is_impure(node):
            g.erase_node(node)


def _dead_tensors(gm: fx.GraphModule) -> list[str]:
    """Qualified names of parameters/buffers that no get_attr reads and no called module owns."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    reached = called | read
    dead = []
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        parts = name.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if not prefixes & reached:
            dead.append(name)
    return dead


class DeadCodeElimination(Pass):
    """Remove dead nodes and the submodules and parameters nothing uses."""

    name = "dce"
    exact = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        gm = graph.module
        before_nodes = {n.name for n in gm.graph.nodes}
        _eliminate_dead_code(gm.graph)
        removed_nodes = sorted(before_nodes - {n.name for n in gm.graph.nodes})

        before_modules = {name for name, _ in gm.named_modules() if name}
        gm.delete_all_unused_submodules()
        removed_modules = sorted(before_modules - {name for name, _ in gm.named_modules() if name})

        removed_params = _dead_tensors(gm)
        for name in removed_params:
            owner, _, attr = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            if hasattr(mod, attr):
                delattr(mod, attr)
        modified = bool(removed_nodes or removed_modules or removed_params)
        if modified:
            gm.recompile()
        report = {
            "removed_nodes": removed_nodes,
            "removed_modules": removed_modules,
            "removed_parameters": removed_params,
            "summary": (
                f"removed {len(removed_nodes)} nodes, {len(removed_modules)} modules, "
                f"{len(removed_params)} parameters"
            ),
        }
        return PassResult(modified, report)
