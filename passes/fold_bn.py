"""``fold-bn``: fold eval-mode BatchNorm into the neighbouring convolution or linear layer.

With ``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s`` a BatchNorm is
the per-channel affine map ``bn(x) = s * x + t``.

* **Forward** (``layer -> BN``, the layer's only user is the BN):
  ``bn(W x + b) = (s ⊙ W) x + (s * b + t)``, i.e. each *output* channel's weights are scaled by
  ``s`` and the bias becomes ``s * b + t``. For Conv, ConvTranspose (whose weight holds output
  channels on dim 1, per group) and Linear (only when the BN normalises the linear's feature
  dimension, i.e. a 2-D ``[N, C]`` output).
* **Backward** (``BN -> layer``, the BN's only user is the layer): ``W (s * x + t) + b =
  (W ⊙ s) x + (b + W t)``: each *input* channel's weights are scaled by ``s`` and the bias gains
  ``W t`` summed over input channels and kernel taps. Exact only when nothing pads the BN's
  output with zeros (``padding = 0`` or a non-zero padding mode), since ``bn(0) = t ≠ 0``.

A BN is left alone, with the reason in the report, when it is in training mode, uses batch
statistics, is shared by several call sites, normalises a different dimension, or its
neighbour has another user.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.graph import Graph, node_meta
from graphopt.pass_api import Pass, PassContext, PassResult

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class FoldBNOptions:
    backward: bool = field(
        default=True,
        metadata={"help": "also fold a BN into the conv/linear it feeds (BN -> layer)"},
    )


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _call_sites(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    return counts


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``bn(x) = s * x + t`` per channel, in float64."""
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - mean * s


def _bias(layer: nn.Module, n_out: int, like: torch.Tensor) -> torch.Tensor:
    if layer.bias is None:
        return torch.zeros(n_out, dtype=torch.float64)
    return layer.bias.detach().double()


def _set(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    dtype = layer.weight.dtype
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(dtype), requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(bias.to(dtype))


def fold_forward(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into the output channels of ``layer`` (Conv, ConvTranspose or Linear)."""
    s, t = bn_affine(bn)
    w = layer.weight.detach().double()
    if isinstance(layer, _CONVT):
        g = layer.groups
        w_ = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        shape = [1] * w_.dim()
        shape[0], shape[2] = g, w.shape[1]
        w = (w_ * s.reshape(shape)).reshape(w.shape)
        n_out = w.shape[1] * g
    else:
        w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
        n_out = w.shape[0]
    b = _bias(layer, n_out, w) * s + t
    _set(layer, w, b)


def fold_backward(bn: nn.Module, layer: nn.Module) -> None:
    """Fold ``bn`` into the input channels of ``layer`` (Conv or Linear)."""
    s, t = bn_affine(bn)
    w = layer.weight.detach().double()
    n_out = w.shape[0]
    g = getattr(layer, "groups", 1)
    in_g = w.shape[1]
    # input channel of weight [o, i] is group(o) * in_g + i
    group_of_out = torch.arange(n_out) // (n_out // g)
    idx = group_of_out[:, None] * in_g + torch.arange(in_g)[None, :]
    s_oi, t_oi = s[idx], t[idx]
    extra = [1] * (w.dim() - 2)
    b = _bias(layer, n_out, w) + (w * t_oi.reshape(n_out, in_g, *extra)).flatten(1).sum(1)
    w = w * s_oi.reshape(n_out, in_g, *extra)
    _set(layer, w, b)


class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the adjacent Conv / ConvTranspose / Linear."""

    name = "fold-bn"
    exact = True
    Options = FoldBNOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        gm = graph.module
        sites = _call_sites(gm)
        folded: list[dict[str, str]] = []
        not_folded: list[dict[str, str]] = []
        for node in list(gm.graph.nodes):
            bn = _module(gm, node)
            if not isinstance(bn, _BN):
                continue
            path = str(node.target)
            reason = self._refusal(bn, node, sites)
            if reason is None:
                outcome = self._try_forward(gm, node, bn, sites)
                if isinstance(outcome, dict):
                    folded.append(outcome)
                    continue
                fwd_reason = outcome
                bwd = self._try_backward(gm, node, bn, sites) if self.options.backward else None
                if isinstance(bwd, dict):
                    folded.append(bwd)
                    continue
                reason = fwd_reason if bwd is None else f"{fwd_reason}; and {bwd}"
            not_folded.append({"bn": path, "reason": reason})
        if folded:
            gm.delete_all_unused_submodules()
            gm.recompile()
        total = len(folded) + len(not_folded)
        return PassResult(
            bool(folded),
            {
                "folded": folded,
                "not_folded": not_folded,
                "summary": f"folded {len(folded)} of {total} BatchNorms",
            },
        )

    @staticmethod
    def _refusal(bn: nn.Module, node: fx.Node, sites: dict[str, int]) -> str | None:
        if node_meta(node).leaf:
            return "is a leaf module"
        if bn.training:
            return "is in training mode (call model.eval() before tracing)"
        if not bn.track_running_stats or bn.running_mean is None:
            return (
                "has no running statistics (track_running_stats=False), so it uses batch statistics"
            )
        if sites[str(node.target)] > 1:
            return f"is called at {sites[str(node.target)]} places (shared module)"
        if len(node.args) != 1 or node.kwargs:
            return "is called with extra arguments"
        return None

    def _try_forward(self, gm, node, bn, sites) -> dict[str, str] | str:
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module":
            return "its input is not a conv/linear module"
        layer = gm.get_submodule(prev.target)
        if not isinstance(layer, (*_CONV, *_CONVT, nn.Linear)):
            return f"its input comes from {type(layer).__name__}, not a conv/linear"
        if node_meta(prev).leaf:
            return f"its input layer {prev.target!r} is a leaf module"
        if sites[str(prev.target)] > 1:
            return f"layer {prev.target!r} is called at several places (shared weights)"
        if len(prev.users) != 1:
            others = ", ".join(u.name for u in prev.users if u is not node)
            return f"the output of {prev.target!r} has other users ({others})"
        n_out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if n_out != bn.num_features:
            return f"{prev.target!r} has {n_out} output channels but the BN has {bn.num_features}"
        if isinstance(layer, nn.Linear):
            shape = node_meta(prev).shape
            if shape is None or len(shape) != 2:
                return (
                    f"the BN normalises dim 1 of a {len(shape) if shape else '?'}-D linear output, "
                    "not the linear's feature dimension"
                )
        fold_forward(layer, bn)
        self._splice(gm, node, prev)
        return {"bn": str(node.target), "into": str(prev.target), "direction": "forward"}

    def _try_backward(self, gm, node, bn, sites) -> dict[str, str] | str | None:
        if len(node.users) != 1:
            return None
        (nxt,) = node.users
        layer = _module(gm, nxt)
        if not isinstance(layer, (*_CONV, nn.Linear)):
            return None
        if node_meta(nxt).leaf or sites[str(nxt.target)] > 1:
            return f"next layer {nxt.target!r} is a leaf or shared"
        if nxt.args[0] is not node or len(nxt.args) != 1 or nxt.kwargs:
            return None
        n_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        if n_in != bn.num_features:
            return None
        if isinstance(layer, nn.Linear):
            shape = node_meta(node).shape
            if shape is None or len(shape) != 2:
                return "the following linear does not read the BN's channel dimension"
        elif layer.padding_mode == "zeros" and any(
            p != 0 for p in (layer.padding if isinstance(layer.padding, tuple) else (1,))
        ):
            return f"the following conv {nxt.target!r} zero-pads its input, so folding would not be exact"
        fold_backward(bn, layer)
        self._splice(gm, node, nxt, into_next=True)
        return {"bn": str(node.target), "into": str(nxt.target), "direction": "backward"}

    @staticmethod
    def _splice(
        gm: fx.GraphModule, bn_node: fx.Node, layer_node: fx.Node, into_next: bool = False
    ) -> None:
        src = bn_node.args[0]
        layer_meta = node_meta(layer_node)
        layer_meta.provenance = [*layer_meta.provenance, *node_meta(bn_node).provenance]
        if into_next:
            layer_node.replace_input_with(bn_node, src)
        else:
            bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
