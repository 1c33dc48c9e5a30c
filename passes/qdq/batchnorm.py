"""BatchNorms that no fold removed, rewritten as depthwise 1x1 convolutions so they quantize.

A BatchNorm that sits after a ReLU (or anywhere ``fold-bn`` cannot fold it exactly) would run
in float between a DequantizeLinear and a QuantizeLinear. In inference it is a per-channel
affine map, which is exactly a depthwise 1x1 convolution::

    BN(x)_c = γ_c (x_c - μ_c) / sqrt(σ²_c + ε) + β_c = a_c x_c + b_c,
    a_c = γ_c / sqrt(σ²_c + ε),   b_c = β_c - μ_c a_c,

so ``Conv{d}(C, C, 1, groups=C)`` with weight ``a`` and bias ``b`` computes the same thing and
ORT runs it as an integer QLinearConv (each channel's one weight is its own per-channel scale,
so the int8 weight is exact up to rounding of ``a_c`` to ``127 · s``).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.graph import node_meta
from graphopt.optypes import BATCHNORM, call_sites

_CONV_FOR = {nn.BatchNorm1d: nn.Conv1d, nn.BatchNorm2d: nn.Conv2d, nn.BatchNorm3d: nn.Conv3d}


def batchnorm_as_conv(bn: nn.Module) -> nn.Module:
    """The depthwise 1x1 convolution equal to ``bn`` in inference."""
    c = bn.num_features
    conv = _CONV_FOR[type(bn)](c, c, 1, groups=c, bias=True)
    with torch.no_grad():
        a = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight.double()
        b = -bn.running_mean.double() * a
        if bn.bias is not None:
            b = b + bn.bias.double()
        conv.weight.copy_(a.float().reshape(c, *([1] * (conv.weight.dim() - 1))))
        conv.bias.copy_(b.float())
    return conv


def rewrite_batchnorms(gm: fx.GraphModule, skip) -> list[dict[str, str]]:
    """Replace every eval-mode BatchNorm{1,2,3}d with tracked running statistics, called once
    on a 3-D or wider input, by its depthwise 1x1 convolution. Returns what was rewritten."""
    sites = call_sites(gm)
    done = []
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        bn = gm.get_submodule(str(n.target))
        if type(bn) not in BATCHNORM or bn.training or bn.running_mean is None:
            continue
        shape = node_meta(n.args[0]).shape if n.args and isinstance(n.args[0], fx.Node) else None
        if sites[str(n.target)] > 1 or shape is None or len(shape) < 3 or skip(n):
            continue
        parent, _, name = str(n.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, batchnorm_as_conv(bn))
        done.append({"node": n.name, "module": str(n.target)})
    if done:
        gm.recompile()
    return done
