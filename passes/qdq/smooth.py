"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before int8.

Transformer activations have a few channels far larger than the rest, so one per-tensor
activation scale wastes most of int8 on them; weights are easy to quantize per channel. For a
LayerNorm whose every consumer is a Linear reading it directly, with per-channel activation
range ``m_j = max|X_j|`` (over the calibration batches) and weight range
``w_j = max over consumers and output rows |W_ij|``::

    s_j = m_j^α / w_j^(1-α)          (clamped to [1e-5, 1e5])
    LN.weight_j /= s_j, LN.bias_j /= s_j        (so X'_j = X_j / s_j)
    W'_ij = W_ij · s_j               for every consumer Linear

``X' W'^T = X W^T`` exactly in real arithmetic, so the float model is unchanged up to rounding,
while ``X'`` has flatter channels. ``α`` (``qdq(smooth=ALPHA)``) trades activation against
weight difficulty; 0.5 is the paper's default for most models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.optypes import call_sites


def smoothable(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node]]]:
    """``(layernorm node, consumer linear nodes)`` pairs SmoothQuant can rewrite exactly."""
    sites = call_sites(gm)
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or sites[str(n.target)] > 1:
            continue
        ln = gm.get_submodule(str(n.target))
        if (
            type(ln) is not nn.LayerNorm
            or not ln.elementwise_affine
            or len(ln.normalized_shape) != 1
        ):
            continue
        users = list(n.users)
        if not users or not all(
            u.op == "call_module"
            and type(gm.get_submodule(str(u.target))) is nn.Linear
            and sites[str(u.target)] == 1
            and u.args[0] is n
            and len(u.args) == 1
            for u in users
        ):
            continue
        out.append((n, users))
    return out


@torch.no_grad()
def smooth(
    gm: fx.GraphModule,
    batches: Iterable[tuple[torch.Tensor, ...]],
    alpha: float,
    skip: Callable[[fx.Node], bool] = lambda n: False,
) -> list[dict[str, object]]:
    """Apply SmoothQuant to every :func:`smoothable` LayerNorm; returns what was scaled."""
    pairs = [
        (ln, users) for ln, users in smoothable(gm) if not skip(ln) and not any(map(skip, users))
    ]
    if not pairs:
        return []
    ranges: dict[str, torch.Tensor] = {}
    hooks = []
    for ln, _ in pairs:
        path = str(ln.target)

        def record(mod, args, out, path=path):
            m = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float()
            ranges[path] = torch.maximum(ranges[path], m) if path in ranges else m

        hooks.append(gm.get_submodule(path).register_forward_hook(record))
    try:
        for inputs in batches:
            gm(*inputs)
    finally:
        for h in hooks:
            h.remove()
    done = []
    for ln, users in pairs:
        path = str(ln.target)
        if path not in ranges:
            continue
        linears = [gm.get_submodule(str(u.target)) for u in users]
        w = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0).float()
        m = ranges[path]
        s = (m.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)).clamp(1e-5, 1e5)
        norm = gm.get_submodule(path)
        norm.weight.div_(s)
        if norm.bias is not None:
            norm.bias.div_(s)
        for lin in linears:
            lin.weight.mul_(s)
        done.append(
            {
                "layernorm": path,
                "linears": [str(u.target) for u in users],
                "activation_range_before": round(float(m.max() / m.median().clamp_min(1e-12)), 2),
                "activation_range_after": round(
                    float((m / s).max() / (m / s).median().clamp_min(1e-12)), 2
                ),
            }
        )
    return done
