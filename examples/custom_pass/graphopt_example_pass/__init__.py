"""An example graphopt plug-in pass: ``strip-noops``.

``x.contiguous()`` and ``x.detach()`` return a tensor with the same values as ``x``; in an
inference graph they are no-ops that only cost a node (and, for ``contiguous``, maybe a copy).
This pass wires each call's input straight to its users and erases the call. It is **exact**:
the manager checks the outputs did not change.

    strip-noops                      # both methods
    strip-noops(methods=[detach])    # only .detach()

Calls with extra arguments (``x.contiguous(memory_format=...)``) are kept: they are not no-ops
for the layout, and the report says which nodes were kept and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from graphopt import Graph, Pass, PassContext, PassResult

Method = Literal["contiguous", "detach"]


@dataclass(frozen=True)
class StripNoopsOptions:
    # Typed options: the pipeline parser checks names and types ("methods=[clone]" is refused
    # with the list of choices), and `graphopt passes` prints the help text.
    methods: tuple[Method, ...] = field(
        default=("contiguous", "detach"),
        metadata={"help": "tensor methods to remove when called without arguments"},
    )


class StripNoops(Pass):
    """Remove no-op tensor method calls (.contiguous(), .detach())."""

    name = "strip-noops"
    exact = True
    Options = StripNoopsOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed: list[str] = []
        kept: list[dict[str, str]] = []
        fx_graph = graph.fx_graph
        for node in list(fx_graph.nodes):
            if node.op != "call_method" or node.target not in self.options.methods:
                continue
            if len(node.args) != 1 or node.kwargs:
                kept.append({"node": node.name, "reason": "called with arguments"})
                continue
            node.replace_all_uses_with(node.args[0])
            fx_graph.erase_node(node)
            removed.append(node.name)
        # Return modified=True only when the graph changed: the manager then recompiles,
        # re-propagates shapes and verifies the outputs (this pass is exact).
        return PassResult(
            modified=bool(removed),
            report={
                "removed": removed,
                "kept": kept,
                "summary": f"removed {len(removed)} no-op call(s)",
            },
        )


__all__ = ["StripNoops", "StripNoopsOptions"]
