"""``remove-identity``: drop no-op nodes — ``nn.Identity``, ``nn.Dropout*`` in eval mode (or
with ``p = 0``) and functional dropout with ``training=False`` — by wiring their input
straight to their users: ``y = x`` so every use of ``y`` becomes a use of ``x``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.graph import Graph, node_meta
from graphopt.pass_api import Pass, PassContext, PassResult

_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_FUNCTIONAL_DROPOUTS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    torch.dropout,
}


class RemoveIdentity(Pass):
    """Remove Identity and eval-mode Dropout nodes."""

    name = "remove-identity"
    exact = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        gm = graph.module
        removed: list[str] = []
        kept: list[dict[str, str]] = []
        for node in list(gm.graph.nodes):
            reason = None
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                if node_meta(node).leaf:
                    continue
                if isinstance(mod, nn.Identity):
                    reason = "identity"
                elif isinstance(mod, _DROPOUTS):
                    if not mod.training or mod.p == 0:
                        reason = "dropout"
                    else:
                        kept.append({"node": node.name, "reason": "dropout in training mode"})
            elif node.op == "call_function" and node.target in _FUNCTIONAL_DROPOUTS:
                training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
                if training is False:
                    reason = "dropout"
                else:
                    kept.append(
                        {"node": node.name, "reason": "functional dropout with training=True"}
                    )
            if reason is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
                continue
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed.append(node_meta(node).module_path or node.name)
        if removed:
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(
            bool(removed),
            {
                "removed": removed,
                "kept": kept,
                "summary": f"removed {len(removed)} identity/dropout nodes",
            },
        )
