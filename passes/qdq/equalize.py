"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", ICCV 2019).

For two layers joined channel by channel, ``y = W2 f(W1 x + b1)`` with ``f`` positively
homogeneous (identity or ReLU: ``f(x / s) = f(x) / s`` for ``s > 0``), scaling channel ``i``
by ``s_i`` leaves ``y`` unchanged:

    W1[i] /= s_i,   b1[i] /= s_i,   W2[:, i] *= s_i.

With ``r1_i = max|W1[i]|`` and ``r2_i = max|W2[:, i]|``, ``s_i = sqrt(r1_i / r2_i)`` gives both
the range ``sqrt(r1_i r2_i)``: per-tensor weight quantization then wastes no levels on channels
whose range is small (depthwise convolutions after BatchNorm folding are the classic case), and
the activation between them has more even channel ranges. Chains are equalized pair by pair,
repeated until the scales settle. ReLU6 and other clamps are not scale-equivariant: such pairs
are left alone (the report says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.optypes import CONV as _CONV
from graphopt.optypes import call_sites
from graphopt.optypes import module_of as _module


@dataclass
class Pair:
    first: str
    second: str
    through: str  # "" or "relu"


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(_module(gm, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu)
    return node.op == "call_method" and node.target == "relu"


def _is_clamp(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), (nn.ReLU6, nn.Hardtanh))
    if node.op == "call_function":
        return node.target in (F.relu6, F.hardtanh, torch.clamp, torch.clip)
    return node.op == "call_method" and node.target in ("clamp", "clip")


def find_pairs(gm: fx.GraphModule) -> tuple[list[Pair], list[dict[str, str]]]:
    """Conv/linear pairs joined by identity or ReLU with no other consumer in between; also the
    pairs refused (with the reason)."""
    sites = call_sites(gm)
    pairs, refused = [], []
    for n in gm.graph.nodes:
        m1 = _module(gm, n)
        if type(m1) not in (*_CONV, nn.Linear) or sites[str(n.target)] > 1:
            continue
        if len(n.users) != 1:
            continue
        (u,) = n.users
        through = ""
        if _is_relu(gm, u) and len(u.users) == 1 and u.args[0] is n:
            through, (u,) = "relu", u.users
        elif _is_clamp(gm, u):
            nxt = next(iter(u.users)) if len(u.users) == 1 else None
            if nxt is not None and type(_module(gm, nxt)) in (*_CONV, nn.Linear):
                refused.append(
                    {
                        "pair": f"{n.target} -> {nxt.target}",
                        "reason": "a clamp (ReLU6/Hardtanh) between them is not scale-equivariant",
                    }
                )
            continue
        m2 = _module(gm, u)
        if type(m2) not in (*_CONV, nn.Linear) or sites[str(u.target)] > 1:
            continue
        if len(u.args) != 1 or u.kwargs:
            continue
        if isinstance(m1, nn.Linear) != isinstance(m2, nn.Linear):
            continue  # conv -> flatten -> linear changes the channel layout
        out1 = m1.out_features if isinstance(m1, nn.Linear) else m1.out_channels
        in2 = m2.in_features if isinstance(m2, nn.Linear) else m2.in_channels
        if out1 != in2:
            continue
        pairs.append(Pair(str(n.target), str(u.target), through))
    return pairs, refused


def _input_ranges(layer: nn.Module) -> torch.Tensor:
    """``max|W[:, i]|`` per input channel ``i`` (grouped convs: over the group's outputs)."""
    w = layer.weight.detach().abs()
    if isinstance(layer, nn.Linear):
        return w.amax(0)
    g = layer.groups
    out, in_g = w.shape[0], w.shape[1]
    per = w.flatten(2).amax(2).reshape(g, out // g, in_g).amax(1)  # [g, in_g]
    return per.reshape(-1)


def _scale_inputs(layer: nn.Module, s: torch.Tensor) -> None:
    w = layer.weight
    if isinstance(layer, nn.Linear):
        w.mul_(s[None, :])
        return
    g = layer.groups
    out, in_g = w.shape[0], w.shape[1]
    sg = s.reshape(g, in_g)  # input channel group * in_g + j
    full = sg.repeat_interleave(out // g, dim=0)  # [out, in_g]
    w.mul_(full.reshape(out, in_g, *([1] * (w.dim() - 2))))


def equalize(gm: fx.GraphModule, iterations: int = 20, tol: float = 1e-3) -> dict:
    """Equalize every pair in ``gm`` in place; returns ``{"pairs": [...], "refused": [...]}``
    with the spread ``max r / min r`` of the first layer's channel ranges before and after."""
    pairs, refused = find_pairs(gm)
    before = {}
    for p in pairs:
        r = gm.get_submodule(p.first).weight.detach().abs().flatten(1).amax(1)
        before[p.first] = float(r.max() / r.min().clamp_min(1e-12))
    with torch.no_grad():
        for _ in range(iterations):
            worst = 0.0
            for p in pairs:
                m1, m2 = gm.get_submodule(p.first), gm.get_submodule(p.second)
                r1 = m1.weight.detach().abs().flatten(1).amax(1)
                r2 = _input_ranges(m2)
                ok = (r1 > 0) & (r2 > 0)
                s = torch.ones_like(r1)
                s[ok] = torch.sqrt(r1[ok] / r2[ok])
                m1.weight.div_(s.reshape(-1, *([1] * (m1.weight.dim() - 1))))
                if m1.bias is not None:
                    m1.bias.div_(s)
                _scale_inputs(m2, s)
                worst = max(worst, float((s - 1).abs().max()))
            if worst < tol:
                break
    rows = []
    for p in pairs:
        r = gm.get_submodule(p.first).weight.detach().abs().flatten(1).amax(1)
        rows.append(
            {
                "first": p.first,
                "second": p.second,
                "through": p.through or "identity",
                "spread_before": round(before[p.first], 2),
                "spread_after": round(float(r.max() / r.min().clamp_min(1e-12)), 2),
            }
        )
    return {"pairs": rows, "refused": refused}
