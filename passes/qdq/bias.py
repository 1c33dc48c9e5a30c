"""Bias correction against the float model: each quantized layer's mean output per channel
equals the float model's.

Quantization shifts the mean of a layer's output for two reasons: the layer's own weights are
rounded (``E[(W - W_q) x]``), and its *input* already carries the mean shift of everything
upstream (activation rounding, clipping, a max-pool over noisy values, which is biased
upwards). Correcting only the first (what AIMET calls empirical bias correction on the layer's
own weights) leaves the second to accumulate layer after layer; a mean shift passes through a
convolution coherently (multiplied by the sum of its weights) while rounding noise adds up
incoherently, so after a few layers it dominates the error.

Here the layers are corrected one at a time in execution order, each against the float model
run on the same calibration batches::

    b_l += E[y_l^float(x^float)] - E[y_l^quant(x^quant)]      (per output channel)

where ``y_l^quant`` is layer ``l``'s output (before its activation and output quantizer) in the
fake-quant graph with layers ``< l`` already corrected, and ``y_l^float`` the same layer's
output in the float graph. The expectation runs over batch and spatial positions. Correcting
layer ``l`` shifts its output by exactly ``δ_l``, so one node-by-node run of the fake-quant
graph corrects every layer in order: the cost is one float and one fake-quant forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.quant.modules import QATConv, _QATWeighted

_CONV = (QATConv, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _channel_mean(module: nn.Module, out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``module``'s mean output per channel (dim 1 for a conv, the last dim otherwise) and
    that channel dim."""
    ch = 1 if isinstance(module, _CONV) else out.dim() - 1
    return out.double().mean([d for d in range(out.dim()) if d != ch]), ch


def _means(gm: fx.GraphModule, names: list[str], inputs) -> dict[str, torch.Tensor]:
    """Per-channel mean output of the modules ``names`` of ``gm`` on ``inputs`` (at a module's
    first call, as :class:`_Correcting` corrects it there)."""
    means: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module: nn.Module, args, out):
            means.setdefault(name, _channel_mean(module, out)[0])

        return fn

    handles = [gm.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            gm(*inputs)
    finally:
        for h in handles:
            h.remove()
    return means


def float_bias_correction(
    gm: fx.GraphModule,
    reference: fx.GraphModule,
    batches: list[tuple[torch.Tensor, ...]],
    progress: Callable[..., Iterable],
    budget: int = 20_000_000,
) -> dict[str, float]:
    """Correct every fake-quant layer's bias (in execution order) so that its mean output per
    channel equals the float ``reference``'s (the graph before fake-quant, with the same module
    paths). Returns module path -> max |correction|.

    One float forward and one fake-quant forward over the calibration samples, concatenated
    into one batch (at most 256 samples, fewer when their inputs exceed ``budget`` elements):
    the fake-quant graph runs node by node, and when a layer has run its bias is shifted and
    its output shifted by the same amount (``conv(x, W, b + δ) = conv(x, W, b) + δ``), which is
    what every later layer then sees."""
    names = []
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, _QATWeighted) and not mod.learnable and str(n.target) not in names:
            names.append(str(n.target))
    names = [n for n in names if _has(reference, n)]
    if not names or not batches:
        return {}
    inputs = _concatenated(batches, budget)
    target = _means(reference, names, inputs)
    out: dict[str, float] = {}
    bar = iter(progress(names, desc="qdq: bias correction", total=len(names)))
    with torch.no_grad():
        _Correcting(gm, target, out, bar).run(*inputs)
    for _ in bar:  # layers the graph never reached: finish the bar
        pass
    return out


def _concatenated(batches: list[tuple[torch.Tensor, ...]], budget: int) -> tuple[torch.Tensor, ...]:
    per_sample = sum(t[:1].numel() for t in batches[0]) or 1
    limit = max(1, min(256, budget // per_sample))
    parts = list(zip(*batches))
    return tuple(torch.cat(list(p))[:limit] for p in parts)


class _Correcting(fx.Interpreter):
    """Runs the fake-quant graph once, shifting each corrected layer's bias and output."""

    def __init__(self, gm: fx.GraphModule, target: dict, out: dict, bar) -> None:
        super().__init__(gm)
        self.target, self.out, self.bar = target, out, bar

    def run_node(self, n: fx.Node) -> object:
        value = super().run_node(n)
        name = str(n.target)
        if n.op != "call_module" or name not in self.target or name in self.out:
            return value
        layer = self.module.get_submodule(name)
        mean, ch = _channel_mean(layer, value)
        delta = (self.target[name] - mean).to(layer.weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(delta))
        layer.bias.add_(delta)
        shape = [1] * value.dim()
        shape[ch] = -1
        self.out[name] = float(delta.abs().max())
        next(self.bar, None)
        return value + delta.view(shape)


def _has(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True
