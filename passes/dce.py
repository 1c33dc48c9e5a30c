"""``dce``: remove dead nodes, then the submodules and parameters no node uses any more.

A node is dead when nothing uses its value and it has no side effect (FX's
``Graph.eliminate_dead_code``). Afterwards every submodule no ``call_module``/``get_attr``
node reaches and every root-level parameter or buffer no ``get_attr`` reads is deleted.
"""

from __future__ import annotations

from graphopt.graph import Graph
from graphopt.pass_api import Pass, PassContext, PassResult


class DeadCodeElimination(Pass):
    """Remove dead nodes and the submodules and parameters nothing uses."""

    name = "dce"
    exact = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        gm = graph.module
        before_nodes = {n.name for n in gm.graph.nodes}
        gm.graph.eliminate_dead_code()
        removed_nodes = sorted(before_nodes - {n.name for n in gm.graph.nodes})

        before_modules = {name for name, _ in gm.named_modules() if name}
        gm.delete_all_unused_submodules()
        removed_modules = sorted(before_modules - {name for name, _ in gm.named_modules() if name})

        used_attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        removed_params = []
        for name in [n for n, _ in gm.named_parameters(recurse=False)] + [
            n for n, _ in gm.named_buffers(recurse=False)
        ]:
            if name not in used_attrs:
                delattr(gm, name)
                removed_params.append(name)
        # Submodules reached only through get_attr of one of their tensors are kept by FX.
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
