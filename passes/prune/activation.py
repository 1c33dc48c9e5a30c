"""Activation importance for ``prune``: what each unit feeds the layers that read it, on data.

For a member ``owner.param`` sliced along its *input* dim (a Linear's columns, a convolution's
input channels, a GPT-2 ``Conv1D``'s rows), index ``j`` scores the mean square of the activation
that the weight multiplies there, ``E[x_j²]``, over the data batches and every position (batch,
tokens, pixels). A unit sums its indices, so

- an attention head scores ``E‖o_h‖²``, the squared norm of its attention output, the slice of
  the context the output projection reads (the *attention-output norm*);
- an FFN channel scores the mean square of its activated value, a conv filter that of its
  activated map, a hidden-width channel that of the normalised residual stream.

The activations are read where the graph applies the weight: a ``call_module`` node of the
owner (its first argument) or a ``call_function`` linear / convolution taking the weight's
``get_attr`` (export graphs). ``nn.MultiheadAttention`` applies its output projection inside
the leaf; its heads' outputs come from running the module again with an identity output
projection. Members read nowhere in the graph have no opinion (NaN), as ``bn-scale`` has none
without a norm layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.channels import ChannelAnalysis
from graphopt.errors import DataError
from graphopt.graph import Graph, find_module
from graphopt.pass_api import PassContext

__all__ = ["activation_scores"]

_CONV_MODULES = (nn.modules.conv._ConvNd,)


def activation_scores(
    graph: Graph, ctx: PassContext, batches: int, ca: ChannelAnalysis
) -> dict[tuple[str, str], np.ndarray]:
    """``E[x_j²]`` per input index ``j`` of the weight of each ``"in"`` member of ``ca`` with a
    prunable unit (keyed by ``(owner, param)``), over up to ``batches`` data batches."""
    if ctx.data is None:
        raise DataError(
            "prune: importance=activation needs data (pipeline.run(graph, data=...), CLI --data)"
        )
    gm = graph.module
    wanted = {
        (m.owner, m.param)
        for m in ca.members
        if m.kind == "in" and ca.unit_prunable[ca.units_of(m)].any()
    }
    watch: dict[fx.Node, tuple[tuple[str, str], int, nn.Module | None]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = find_module(gm, ca.modules, str(node.target))
            key = (str(node.target), "weight")
            if isinstance(mod, nn.MultiheadAttention):
                key = (f"{node.target}.out_proj", "weight")
                if key in wanted:
                    watch[node] = (key, -1, _identity_projection(mod))
            elif key in wanted:
                watch[node] = (key, 1 if isinstance(mod, _CONV_MODULES) else -1, None)
        elif node.op == "call_function" and len(node.args) > 1:
            w = node.args[1]
            name = getattr(node.target, "__name__", str(node.target))
            if (
                isinstance(w, fx.Node)
                and w.op == "get_attr"
                and ("linear" in name or "conv" in name)
            ):
                owner, _, param = str(w.target).rpartition(".")
                if (owner, param) in wanted:
                    watch[node] = ((owner, param), 1 if "conv" in name else -1, None)
    sums: dict[tuple[str, str], torch.Tensor] = {}
    counts: dict[tuple[str, str], int] = {}
    capture = _Capture(gm, watch, sums, counts)
    seen = 0
    with torch.no_grad():
        for inputs, _ in ctx.batches():
            if seen >= batches:
                break
            capture.run(*inputs)
            seen += 1
    if not seen:
        raise DataError("prune: importance=activation got no data batches")
    return {k: (s / counts[k]).numpy() for k, s in sums.items()}


class _Capture(fx.Interpreter):
    """Runs the graph, adding ``Σ x_j²`` of every watched node's input into ``sums``."""

    def __init__(self, gm: fx.GraphModule, watch: dict, sums: dict, counts: dict) -> None:
        super().__init__(gm)
        self.watch, self.sums, self.counts = watch, sums, counts

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        hit = self.watch.get(n)
        if hit is not None:
            key, dim, twin = hit
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x = args[0]
            if twin is not None:  # the heads' concatenated outputs, before out_proj
                x = twin(*args, **{**kwargs, "need_weights": False})[0]
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0:
                x = x.detach().double().movedim(dim, -1)
                flat = x.reshape(-1, x.shape[-1])
                s = (flat * flat).sum(0)
                self.sums[key] = self.sums[key] + s if key in self.sums else s
                self.counts[key] = self.counts.get(key, 0) + flat.shape[0]
        return out


def _identity_projection(mha: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """A twin of ``mha`` sharing every parameter but ``out_proj``, an identity (with a zero
    bias where ``mha``'s has one): its output is the heads' outputs side by side, what
    ``mha.out_proj`` reads."""
    twin = nn.MultiheadAttention.__new__(type(mha))
    twin.__dict__ = dict(mha.__dict__)
    twin._modules = dict(mha._modules)
    e, dtype = mha.embed_dim, mha.out_proj.weight.dtype
    eye = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
    eye.weight = nn.Parameter(torch.eye(e, dtype=dtype), requires_grad=False)
    if eye.bias is not None:
        eye.bias = nn.Parameter(torch.zeros(e, dtype=dtype), requires_grad=False)
    twin._modules["out_proj"] = eye
    twin.eval()
    return twin
