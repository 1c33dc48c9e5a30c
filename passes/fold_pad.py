"""``fold-pad``: fold an explicit zero ``Pad`` into the padding of the convolution it feeds.

``conv(pad(x, p), W, padding=q) == conv(x, W, padding=q + p)`` when the pad writes zeros,
pads each spatial side of a dimension by the same amount (torch's conv padding is symmetric),
touches no batch or channel dimension, and the conv pads with zeros too
(``padding_mode="zeros"``). Matched pads: ``F.pad(x, pad, mode="constant", value=0)``,
``nn.ZeroPad1d/2d/3d`` and ``nn.ConstantPad1d/2d/3d`` with value 0. A pad with other users
stays for them; the conv that read it reads ``x`` with its padding grown.

Exact: outputs are unchanged. It matters for int8: a separate Pad between quantize/dequantize
pairs runs in float and costs an extra pair (see the quantization fidelity issue); folded, the
conv's own padding pads with the zero point.

The report lists every folded pad and, for each refused one, why (``check`` gives the reason).
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.graph import Graph
from graphopt.optypes import CONV, module_of
from graphopt.pass_api import Pass, PassContext, PassResult

_PAD_MODULES = (
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)


def pad_of(gm: fx.GraphModule, node: fx.Node) -> tuple[tuple[int, ...], str | None]:
    """``(pad, None)``: the torch ``F.pad`` widths of a zero pad node (last dim first), or
    ``((), reason)`` when ``node`` is not one."""
    if node.op == "call_function" and node.target is F.pad:
        args = list(node.args) + [None] * 4
        pad = node.kwargs.get("pad", args[1])
        mode = node.kwargs.get("mode", args[2] if args[2] is not None else "constant")
        value = node.kwargs.get("value", args[3] if args[3] is not None else 0.0)
        if mode != "constant":
            return (), f"pad mode {mode!r} is not zeros"
        if value not in (0, 0.0, None):
            return (), f"pad value {value} is not 0"
        if not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
            return (), "pad widths are not constants"
        return tuple(pad), None
    mod = module_of(gm, node)
    if isinstance(mod, _PAD_MODULES):
        if float(getattr(mod, "value", 0.0)) != 0.0:
            return (), f"pad value {mod.value} is not 0"
        return tuple(int(p) for p in mod.padding), None
    return (), "not a pad"


def check(gm: fx.GraphModule, pad: fx.Node, conv_node: fx.Node) -> str | None:
    """Why ``pad`` cannot fold into ``conv_node`` (``None``: it can)."""
    widths, reason = pad_of(gm, pad)
    if reason:
        return reason
    conv = module_of(gm, conv_node)
    if type(conv) not in CONV:
        return "its user is not a Conv1d/2d/3d"
    if conv_node.args[0] is not pad or len(conv_node.args) != 1 or conv_node.kwargs:
        return "the conv reads it with extra arguments"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"the conv pads with {conv.padding_mode!r} / {conv.padding!r}"
    dims = len(conv.kernel_size)
    if len(widths) % 2 or len(widths) // 2 > dims:
        return f"pads {len(widths) // 2} dimensions of a {dims}-d conv input's spatial ones"
    pairs = [widths[i : i + 2] for i in range(0, len(widths), 2)]
    if any(a != b for a, b in pairs):
        return f"asymmetric pad {widths}: conv padding is the same on both sides"
    if any(a < 0 for a, _ in pairs):
        return f"negative pad {widths} crops"
    return None


def _grown_padding(conv: nn.Module, widths: tuple[int, ...]) -> tuple[int, ...]:
    dims = len(conv.kernel_size)
    extra = [0] * dims
    for i in range(0, len(widths), 2):  # widths run last dimension first
        extra[dims - 1 - i // 2] = widths[i]
    return tuple(int(p) + e for p, e in zip(conv.padding, extra))


class FoldPad(Pass):
    """Fold zero padding into the convolution that follows it (exact)."""

    name = "fold-pad"
    exact = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        gm = graph.module
        folded, refused = [], []
        for pad in list(gm.graph.nodes):
            widths, not_a_pad = pad_of(gm, pad)
            if not_a_pad is not None:
                continue
            for user in list(pad.users):
                why = check(gm, pad, user)
                if why:
                    refused.append({"pad": pad.name, "user": user.name, "reason": why})
                    continue
                conv = module_of(gm, user)
                conv.padding = _grown_padding(conv, widths)
                user.args = (pad.args[0],)
                folded.append({"pad": pad.name, "conv": str(user.target), "padding": conv.padding})
            if not pad.users:
                gm.graph.erase_node(pad)
        if folded:
            gm.graph.eliminate_dead_code()
            graph.recompile()
        return PassResult(
            bool(folded),
            {
                "summary": f"folded {len(folded)} pads into convolutions"
                + (f", {len(refused)} left" if refused else ""),
                "folded": folded,
                "refused": refused,
            },
        )
