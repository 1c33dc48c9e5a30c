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
  output with zeros (``padding = 0`` or a non-zero padding mode: reflect, replicate and
  circular padding copy ``bn(x)`` values), since ``bn(0) = t ≠ 0``. Not done for
  ConvTranspose, whose border outputs sum fewer input taps than interior ones.

A BN is left alone, with the reason in the report, when it is in training mode, uses batch
statistics, is shared by several call sites, normalises a different dimension, or its
neighbour has another user, is shared, is a leaf, or has its weights read elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.graph import Graph, node_meta
from graphopt.optypes import CONV as _CONV
from graphopt.optypes import CONV_T as _CONVT
from graphopt.optypes import call_sites
from graphopt.optypes import module_of as _module
from graphopt.pass_api import Pass, PassContext, PassResult

_BN = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*


@dataclass(frozen=True)
class FoldBNOptions:
    backward: bool = field(
        default=True,
        metadata={"help": "also fold a BN into the conv/linear it feeds (BN -> layer)"},
    )


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """``name (what)`` of a node, for reasons: ``add (operator.add)``, ``layer1.relu (ReLU)``."""
    if node.op == "call_module":
        return f"{node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        fn = node.target
        what = f"{getattr(fn, '__module__', None) or ''}.{getattr(fn, '__name__', fn)}".lstrip(".")
        return f"{node.name!r} ({what.replace('_operator.', 'operator.')})"
    if node.op == "call_method":
        return f"{node.name!r} (Tensor.{node.target})"
    if node.op == "placeholder":
        return f"the model input {node.name!r}"
    if node.op == "output":
        return "the model output"
    return f"{node.name!r} ({node.op} {node.target})"


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``bn(x) = s * x + t`` per channel, in float64."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - mean * s


def _bias(layer: nn.Module, n_out: int, like: torch.Tensor) -> torch.Tensor:
    if layer.bias is None:
        return torch.zeros(n_out, dtype=torch.float64, device=like.device)
    return layer.bias.detach().double()


def _set(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    dtype, device = layer.weight.dtype, layer.weight.device
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(
                bias.to(device=device, dtype=dtype), requires_grad=layer.weight.requires_grad
            )
        else:
            layer.bias.copy_(bias.to(dtype))


def fold_forward(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into the output channels of ``layer`` (Conv, ConvTranspose or Linear)."""
    s, t = bn_affine(bn)
    w = layer.weight.detach().double()
    s, t = s.to(w.device), t.to(w.device)
    if isinstance(layer, _CONVT):
        # weight [in, out/g, k...]; output channel of (group, j) is group * out/g + j
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
    s, t = s.to(w.device), t.to(w.device)
    n_out = w.shape[0]
    g = getattr(layer, "groups", 1)
    in_g = w.shape[1]
    # input channel of weight [o, i] is group(o) * in_g + i
    group_of_out = torch.arange(n_out, device=w.device) // (n_out // g)
    idx = group_of_out[:, None] * in_g + torch.arange(in_g, device=w.device)[None, :]
    s_oi, t_oi = s[idx], t[idx]
    extra = [1] * (w.dim() - 2)
    b = _bias(layer, n_out, w) + (w * t_oi.reshape(n_out, in_g, *extra)).flatten(1).sum(1)
    w = w * s_oi.reshape(n_out, in_g, *extra)
    _set(layer, w, b)


def _zero_padded(conv: nn.Module) -> str | None:
    """Why ``conv`` pads its input with zeros (``None`` when it does not)."""
    if conv.padding_mode != "zeros":
        return None  # reflect / replicate / circular pad with copies of the input
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return None
        # "same": pads (dilation * (k - 1)) in total per spatial dim
        if all(d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size)):
            return None
        return "padding='same'"
    if any(p != 0 for p in pad):
        return f"padding={tuple(pad)}"
    return None


class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the adjacent Conv / ConvTranspose / Linear."""

    name = "fold-bn"
    exact = True
    Options = FoldBNOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        gm = graph.module
        sites = call_sites(gm)
        self._read_attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        self._tensor_owners = self._owners(gm)
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
                reason = f"forward: {outcome}"
                if self.options.backward:
                    bwd = self._try_backward(gm, node, bn, sites)
                    if isinstance(bwd, dict):
                        folded.append(bwd)
                        continue
                    reason += f"; backward: {bwd}"
                else:
                    reason += "; backward: not tried (fold-bn(backward=false))"
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

    # -- checks --------------------------------------------------------------------------------
    @staticmethod
    def _owners(gm: fx.GraphModule) -> dict[int, set[str]]:
        """``id(tensor) -> {qualified names}`` over every parameter and buffer (tied weights
        appear under several names)."""
        owners: dict[int, set[str]] = {}
        for name, p in gm.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), set()).add(name)
        for name, b in gm.named_buffers(remove_duplicate=False):
            owners.setdefault(id(b), set()).add(name)
        return owners

    def _layer_refusal(self, gm, layer_node: fx.Node, layer: nn.Module, sites) -> str | None:
        """Why the weights of ``layer`` may not be rewritten (``None`` when they may)."""
        target = str(layer_node.target)
        if node_meta(layer_node).leaf:
            return f"{target!r} is a leaf module (its weights are locked)"
        if sites[target] > 1:
            return f"{target!r} is called at {sites[target]} places (shared weights)"
        if len(layer_node.args) != 1 or layer_node.kwargs:
            return f"{target!r} is called with extra arguments"
        for pname in ("weight", "bias"):
            p = getattr(layer, pname, None)
            if p is None:
                continue
            qual = f"{target}.{pname}"
            if qual in self._read_attrs:
                return f"{qual!r} is also read directly by another node"
            others = self._tensor_owners.get(id(p), set()) - {qual}
            if others:
                return f"{qual!r} is tied to {', '.join(sorted(others))} (shared parameter)"
        return None

    @staticmethod
    def _refusal(bn: nn.Module, node: fx.Node, sites: dict[str, int]) -> str | None:
        target = str(node.target)
        if node_meta(node).leaf:
            return "the BN is a leaf module (its parameters are locked)"
        if bn.training:
            return (
                "the BN is in training mode, so it normalises with batch statistics "
                "(call .eval() on it before tracing)"
            )
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            return (
                "the BN has no running statistics (track_running_stats=False), so it "
                "normalises with batch statistics even in eval mode"
            )
        if sites[target] > 1:
            return (
                f"the BN module is shared: called at {sites[target]} places, and folding it "
                "into one neighbour would change the others"
            )
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return "the BN is called with extra arguments"
        return None

    # -- layer -> BN -----------------------------------------------------------------------------
    def _try_forward(self, gm, node, bn, sites) -> dict[str, str] | str:
        prev = node.args[0]
        layer = _module(gm, prev)
        if not isinstance(layer, (*_CONV, *_CONVT, nn.Linear)):
            return f"its input comes from {_describe(prev, gm)}, not a conv/linear module"
        why = self._layer_refusal(gm, prev, layer, sites)
        if why:
            return why
        if len(prev.users) != 1:
            others = ", ".join(_describe(u, gm) for u in prev.users if u is not node)
            return (
                f"the output of {prev.target!r} is also used by {others}, which must keep "
                "seeing the un-normalised value"
            )
        n_out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if n_out != bn.num_features:
            return (
                f"{prev.target!r} has {n_out} output channels but the BN normalises "
                f"{bn.num_features} (a different dimension)"
            )
        if isinstance(layer, nn.Linear):
            shape = node_meta(prev).shape
            if shape is None or len(shape) != 2:
                rank = f"{len(shape)}-D" if shape is not None else "unknown-rank"
                return (
                    f"the BN normalises dim 1 of the {rank} output of linear {prev.target!r}, "
                    "not the linear's feature dimension (the last one)"
                )
        fold_forward(layer, bn)
        self._splice(gm, node, prev)
        return {"bn": str(node.target), "into": str(prev.target), "direction": "forward"}

    # -- BN -> layer -----------------------------------------------------------------------------
    def _try_backward(self, gm, node, bn, sites) -> dict[str, str] | str:
        if len(node.users) != 1:
            users = ", ".join(_describe(u, gm) for u in node.users)
            return f"its output has {len(node.users)} users ({users}), not one conv/linear"
        (nxt,) = node.users
        layer = _module(gm, nxt)
        if isinstance(layer, _CONVT):
            return (
                f"it feeds transposed conv {nxt.target!r}, whose border outputs would get "
                "a different bias than the interior"
            )
        if not isinstance(layer, (*_CONV, nn.Linear)):
            return f"it feeds {_describe(nxt, gm)}, not a conv/linear module"
        why = self._layer_refusal(gm, nxt, layer, sites)
        if why:
            return why
        if nxt.args[0] is not node:
            return f"{nxt.target!r} does not take the BN output as its input"
        n_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        if n_in != bn.num_features:
            return (
                f"{nxt.target!r} has {n_in} input channels but the BN normalises "
                f"{bn.num_features} (a different dimension)"
            )
        if isinstance(layer, nn.Linear):
            shape = node_meta(node).shape
            if shape is None or len(shape) != 2:
                rank = f"{len(shape)}-D" if shape is not None else "unknown-rank"
                return (
                    f"linear {nxt.target!r} reads the last dim of a {rank} tensor, "
                    "not the BN's channel dimension 1"
                )
        else:
            pad = _zero_padded(layer)
            if pad:
                return (
                    f"conv {nxt.target!r} zero-pads its input ({pad}) and bn(0) = "
                    "beta - mean * gamma / sqrt(var + eps) is not 0, so folding would "
                    "change the border outputs"
                )
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
