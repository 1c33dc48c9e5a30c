"""AdaRound (Nagel et al., ICML 2020): learn whether each weight rounds up or down.

Rounding every weight to nearest minimises each weight's own error, not the layer's output
error. AdaRound learns, per weight, a rounding ``r ∈ {0, 1}`` on top of ``floor(W / s)`` that
minimises the layer's output error on calibration inputs ``X`` (what the layer sees in the
fake-quant model)::

    W~ = s · clamp(floor(W / s) + h(V), -q, q),   h(V) = clamp(σ(V)(ζ - γ) + γ, 0, 1)
    min_V  ‖W X - W~ X‖²  +  λ Σ (1 - |2 h(V) - 1|^β)

with ``ζ = 1.1, γ = -0.1``, ``V`` initialised so that ``h(V)`` equals the fractional part,
and ``β`` annealed from 20 to 2 after a warm start (the regulariser then pushes every ``h``
to 0 or 1). Afterwards ``r = [h(V) ≥ 0.5]`` and the layer's float weight is replaced by
``s · (floor(W / s) + r)``, which the integer conversion then rounds exactly. The weight
scales do not change: the largest weight of a channel stays at ``±q`` steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.quant.modules import QATConv, QATLinear

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _layer_inputs(gm: fx.GraphModule, layer: torch.nn.Module, batches) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for inputs in batches:
                gm(*inputs)
    finally:
        hook.remove()
    return torch.cat(seen)


def _apply(layer, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, QATConv):
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[layer.dim]
        return conv(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w)


def adaround_layer(layer, x: torch.Tensor, iters: int, lam: float = 0.01, seed: int = 0) -> float:
    """Learn the rounding of ``layer``'s weights on inputs ``x``; set the rounded float
    weight. Returns the relative output MSE improvement over rounding to nearest."""
    torch.manual_seed(seed)
    w = layer.weight.detach()
    q = layer.qmax
    s = layer.current_weight_scale().reshape(-1, *([1] * (w.dim() - 1)))
    if not layer.per_channel:
        s = s.reshape(())
    base = torch.floor(w / s)
    frac = (w / s - base).clamp(0.01, 0.99)
    v = torch.log((frac - GAMMA) / (ZETA - frac)).clone().requires_grad_(True)  # h(v) = frac
    target = _apply(layer, w, x).detach()
    opt = torch.optim.Adam([v], lr=1e-2)
    warm = int(0.2 * iters)
    batch = min(len(x), 256)
    for it in range(iters):
        idx = torch.randint(0, len(x), (batch,))
        wq = s * torch.clamp(base + _h(v), -q, q)
        rec = (_apply(layer, wq, x[idx]) - target[idx]).pow(2).mean()
        loss = rec
        if it >= warm:
            t = (it - warm) / max(1, iters - warm)
            beta = 2 + 18 * (1 + math.cos(math.pi * t)) / 2  # 20 -> 2
            loss = rec + lam * (1 - (2 * _h(v) - 1).abs().pow(beta)).sum() / w.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        nearest = s * torch.clamp(torch.round(w / s), -q, q)
        learned = s * torch.clamp(base + (_h(v) >= 0.5).float(), -q, q)
        # a channel's largest weights keep ±q steps, so its scale max|W|/q does not move
        learned = torch.where(w.abs() >= (q - 0.5) * s, nearest, learned)
        err_learned = (_apply(layer, learned, x) - target).pow(2).mean().item()
        err_nearest = (_apply(layer, nearest, x) - target).pow(2).mean().item()
        if err_learned <= err_nearest:
            layer.weight.copy_(learned)
        return 1.0 - min(err_learned, err_nearest) / max(err_nearest, 1e-30)


def adaround(
    gm: fx.GraphModule,
    batches: list,
    iters: int,
    progress: Callable[..., Iterable],
) -> dict[str, float]:
    """AdaRound every fake-quant conv/linear of ``gm`` in graph order; returns, per layer, the
    fraction of the output error of nearest rounding that it removed."""
    layers = [
        (str(n.target), gm.get_submodule(str(n.target)))
        for n in gm.graph.nodes
        if n.op == "call_module"
        and isinstance(gm.get_submodule(str(n.target)), (QATConv, QATLinear))
    ]
    out = {}
    for path, layer in progress(layers, desc="adaround", total=len(layers)):
        if getattr(layer, "learnable", False):
            continue
        x = _layer_inputs(gm, layer, batches)
        out[path] = round(adaround_layer(layer, x, iters), 4)
        log.info("adaround: %s removes %.1f%% of the rounding error", path, 100 * out[path])
    return out
