"""Bias correction against the float model: each quantized layer's mean output per channel
equals the float model's, as far as the calibration data can tell.

Quantization shifts the mean of a layer's output for two reasons: the layer's own weights are
rounded (``E[(W - W_q) x]``), and its *input* already carries the mean shift of everything
upstream (activation rounding, clipping, a max-pool over noisy values, which is biased
upwards). Correcting only the first (what AIMET calls empirical bias correction on the layer's
own weights) leaves the second to accumulate layer after layer; a mean shift passes through a
convolution coherently (multiplied by the sum of its weights) while rounding noise adds up
incoherently, so after a few layers it dominates the error.

Here the layers are corrected one at a time in execution order, each against the float model
run on the same ``N`` calibration samples. For layer ``l``, sample ``n`` and output channel
``c``, the paired error of the sample's mean output (over spatial positions or tokens) is::

    e[n, c] = mean(y_l^float(x_n^float))[c] - mean(y_l^quant(x_n^quant))[c]

where ``y_l^quant`` is layer ``l``'s output (before its activation and output quantizer) in the
fake-quant graph with layers ``< l`` already corrected, and ``y_l^float`` the same layer's
output in the float graph. Its mean over the samples estimates the shift, with a standard
error from the same samples::

    d[c] = (1/N) sum_n e[n, c]        s[c]^2 = var_n(e[n, c]) / N        t[c] = d[c] / s[c]

Rounding noise that is *not* a mean shift still leaves ``d[c] ~ s[c]`` on a finite sample, and
adding that to the bias adds error on new inputs. So the correction is shrunk by how reliable
its estimate is::

    b_l[c] += w[c] d[c],    w[c] = max(0, 1 - 1/t[c]^2) = max(0, 1 - s[c]^2 / d[c]^2)

Why this ``w``: with ``mu`` the true shift, applying ``w d`` changes the expected squared error
of channel ``c`` on new inputs by ``w^2 (mu^2 + s^2) - 2 w mu^2``, which is smallest at
``w = mu^2 / (mu^2 + s^2)``; ``d^2 - s^2`` estimates ``mu^2`` without bias. A channel whose
shift is within one standard error of zero is left alone (``w = 0``), a shift of 3 standard
errors is applied at 0.89, of 10 at 0.99 (conv layers average many positions per sample, so
their ``t`` are large and their corrections almost whole). Samples are the independent unit
(positions within one sample are correlated); with fewer than two samples, or a layer whose
first dimension is not the batch, the positions stand in for them.

Correcting layer ``l`` shifts its output by exactly ``w d``, so one node-by-node run of the
fake-quant graph corrects every layer in order: the cost is one float and one fake-quant
forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.quant.modules import QATConv, _QATWeighted

_CONV = (QATConv, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _channel_dim(module: nn.Module, out: torch.Tensor) -> int:
    """dim 1 for a conv, the last dim otherwise."""
    return 1 if isinstance(module, _CONV) else out.dim() - 1


def _sample_means(module: nn.Module, out: torch.Tensor, samples: int) -> torch.Tensor:
    """``module``'s mean output per sample and channel, ``[samples, C]`` (float64): the mean
    over every other dim. When ``out``'s first dim is not the batch (an unbatched call, a
    sequence-first layout) each position is a row instead."""
    ch = _channel_dim(module, out)
    x = out.detach().double().movedim(ch, -1)
    channels = x.shape[-1]
    if x.dim() >= 2 and x.shape[0] == samples:
        return x.reshape(samples, -1, channels).mean(1)
    return x.reshape(-1, channels)


def shrinkage(errors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``errors[n, c]`` (paired float - quant per sample and channel) -> the estimated shift
    ``d[c]`` and its weight ``w[c] = max(0, 1 - s[c]^2 / d[c]^2)`` (see the module docstring).
    With fewer than two rows there is no standard error: ``w = 1``."""
    d = errors.mean(0)
    if errors.shape[0] < 2:
        return d, torch.ones_like(d)
    se2 = errors.var(0) / errors.shape[0]
    d2 = d * d
    w = torch.where(d2 > 0, 1 - se2 / d2.clamp_min(torch.finfo(d2.dtype).tiny), 0.0)
    return d, w.clamp(0.0, 1.0)


def _per_sample(
    gm: fx.GraphModule, names: list[str], inputs, samples: int
) -> dict[str, torch.Tensor]:
    """Per-sample, per-channel mean outputs of the modules ``names`` of ``gm`` on ``inputs``
    (at a module's first call, as :class:`_Correcting` corrects it there)."""
    means: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module: nn.Module, args, out):
            if name not in means:
                means[name] = _sample_means(module, out, samples)

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
) -> dict[str, dict]:
    """Correct every fake-quant layer's bias (in execution order) so that its mean output per
    channel equals the float ``reference``'s (the graph before fake-quant, with the same module
    paths), each channel's correction weighted by its reliability (module docstring). Returns
    module path -> ``{"max_shift": max |w d|, "weight": mean w, "dropped": channels with
    w = 0, "channels": C}``.

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
    samples = int(inputs[0].shape[0]) if inputs[0].dim() else 1
    target = _per_sample(reference, names, inputs, samples)
    out: dict[str, dict] = {}
    bar = iter(progress(names, desc="qdq: bias correction", total=len(names)))
    with torch.no_grad():
        _Correcting(gm, target, samples, out, bar).run(*inputs)
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

    def __init__(self, gm: fx.GraphModule, target: dict, samples: int, out: dict, bar) -> None:
        super().__init__(gm)
        self.target, self.samples, self.out, self.bar = target, samples, out, bar

    def run_node(self, n: fx.Node) -> object:
        value = super().run_node(n)
        name = str(n.target)
        if n.op != "call_module" or name not in self.target or name in self.out:
            return value
        layer = self.module.get_submodule(name)
        mean, weight = shrinkage(self.target[name] - _sample_means(layer, value, self.samples))
        delta = (weight * mean).to(layer.weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(delta))
        layer.bias.add_(delta)
        shape = [1] * value.dim()
        shape[_channel_dim(layer, value)] = -1
        self.out[name] = {
            "max_shift": round(float(delta.abs().max()), 6),
            "weight": round(float(weight.mean()), 3),
            "dropped": int((weight == 0).sum()),
            "channels": int(weight.numel()),
        }
        next(self.bar, None)
        return value + delta.view(shape)


def _has(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True
