"""``remove-identity``: drop no-op nodes by wiring their input straight to their users (``y = x``,
so every use of ``y`` becomes a use of ``x``):

* ``nn.Identity``;
* ``nn.Dropout*`` / ``nn.AlphaDropout`` / ``nn.FeatureAlphaDropout`` in eval mode or with
  ``p = 0``;
* functional dropout (``F.dropout*``, ``torch.dropout``) with ``training=False`` or ``p = 0``;
* ``torchvision.ops.stochastic_depth`` with ``training=False`` or ``p = 0`` (it returns its
  input unchanged then).

The report lists ``removed`` (module paths for modules, node names for functions) and ``kept``:
``{"node", "reason"}`` for each dropout that is active (training mode, ``p > 0``) or whose
``training`` flag is not a constant.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.fx as fx
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

# function -> (index of p, default p, index of the training flag, default training)
_FUNCTIONAL: dict[Any, tuple[int, float, int, bool]] = {
    F.dropout: (1, 0.5, 2, True),
    F.dropout1d: (1, 0.5, 2, True),
    F.dropout2d: (1, 0.5, 2, True),
    F.dropout3d: (1, 0.5, 2, True),
    F.alpha_dropout: (1, 0.5, 2, False),
    F.feature_alpha_dropout: (1, 0.5, 2, False),
    torch.dropout: (1, 0.5, 2, True),
}
_KW_NAMES = {torch.dropout: ("p", "train")}


def _functional() -> dict[Any, tuple[int, float, int, bool]]:
    """The table, with torchvision's ``stochastic_depth`` when torchvision is loaded (a model
    that calls it has imported it; graphopt does not pay torchvision's import otherwise)."""
    ops = sys.modules.get("torchvision.ops")
    fn = getattr(ops, "stochastic_depth", None) if ops is not None else None
    return {**_FUNCTIONAL, fn: (1, 0.0, 3, True)} if fn is not None else _FUNCTIONAL


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _functional_verdict(node: fx.Node) -> str | None:
    """``None`` when the functional dropout ``node`` is a no-op, else why it is kept."""
    p_i, p_def, t_i, t_def = _functional()[node.target]
    p_name, t_name = _KW_NAMES.get(node.target, ("p", "training"))
    p = _arg(node, p_i, p_name, p_def)
    training = _arg(node, t_i, t_name, t_def)
    name = getattr(node.target, "__name__", str(node.target))
    if isinstance(p, (int, float)) and p == 0:
        return None
    if training is False:
        return None
    if training is True:
        return f"{name} with training=True and p={p} is active"
    return f"{name}'s training flag is computed at run time ({training}), not a constant"


class RemoveIdentity(Pass):
    """Remove Identity, eval-mode Dropout and inactive stochastic depth nodes."""

    name = "remove-identity"
    exact = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        gm = graph.module
        removed: list[str] = []
        kept: list[dict[str, str]] = []
        functional = _functional()
        for node in list(gm.graph.nodes):
            why_kept: str | None = None
            noop = False
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                if isinstance(mod, nn.Identity):
                    noop = True
                elif isinstance(mod, _DROPOUTS):
                    if not mod.training or mod.p == 0:
                        noop = True
                    else:
                        why_kept = f"{type(mod).__name__}(p={mod.p}) is in training mode"
                if noop and node_meta(node).leaf:
                    noop, why_kept = False, "is a leaf module"
            elif node.op == "call_function" and node.target in functional:
                why_kept = _functional_verdict(node)
                noop = why_kept is None
            if noop and (not node.args or not isinstance(node.args[0], fx.Node)):
                noop, why_kept = False, "its input is not passed positionally"
            if why_kept is not None:
                kept.append({"node": node.name, "reason": why_kept})
            if not noop:
                continue
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed.append(str(node.target) if node.op == "call_module" else node.name)
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
