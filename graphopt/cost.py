"""Cost analysis: parameters, multiply-accumulates and bytes, in total and per layer.

MACs come from PyTorch's own ``FlopCounterMode`` (one forward on the example inputs, counting
aten convolutions, matmuls and attention): ``MACs = FLOPs / 2``; the fused fast path of
``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` is switched off while counting so
their matmuls are seen. Layers the counter cannot see are added from their shapes:
recurrent layers (per step and layer, ``g (I·H + H·H)`` with ``g`` = 4 for LSTM, 3 for GRU,
1 for RNN, per direction) and dynamically quantized linears (``tokens · in · out``). Bytes are
the storage of parameters and buffers; params count parameters, quantized weights and the
float biases quantized layers keep as buffers. The same model serves float, quantized and
sparse graphs (sparse storage is the C backend's report).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .graph import Graph, node_meta


@dataclass
class LayerCost:
    path: str
    type: str
    shape: tuple[int, ...] | None
    params: int
    macs: int
    bytes: int


@dataclass
class Cost:
    params: int
    macs: int
    bytes: int
    layers: list[LayerCost] = field(default_factory=list)

    def to_dict(self, layers: bool = False) -> dict[str, Any]:
        d = {"params": self.params, "macs": self.macs, "bytes": self.bytes}
        if layers:
            d["layers"] = [asdict(layer) for layer in self.layers]
        return d

    def table(self) -> str:
        from .table import render

        rows = [
            [
                layer.path,
                layer.type,
                "x".join(map(str, layer.shape)) if layer.shape else "-",
                f"{layer.params:,}",
                f"{layer.macs:,}",
                f"{layer.bytes:,}",
            ]
            for layer in self.layers
        ]
        rows.append(["total", "", "", f"{self.params:,}", f"{self.macs:,}", f"{self.bytes:,}"])
        return render(["layer", "type", "output", "params", "MACs", "bytes"], rows)


_QUANTIZED_STORAGE = (torch.int8, torch.uint8, torch.int32)


def _storage(module: torch.nn.Module, recurse: bool) -> tuple[int, int]:
    """``(params, bytes)``: parameters plus quantized weights and biases (int8 / int32 buffers
    other than zero points) count as params; bytes count every parameter and buffer. A tensor
    shared by several modules counts once, as ``named_parameters`` lists it.

    One walk over the tree's parameter and buffer dicts: the four generator walks of
    ``parameters()`` / ``named_buffers()`` cost ~8 ms on a 300-module network."""
    params = nbytes = 0
    seen: set[int] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
                nbytes += p.numel() * p.element_size()
        for name, b in m._buffers.items():
            if b is None or id(b) in seen:
                continue
            seen.add(id(b))
            nbytes += b.numel() * b.element_size()
            if (b.dtype in _QUANTIZED_STORAGE and "zero_point" not in name) or name == "bias":
                params += b.numel()  # quantized weights, and a quantized layer's float bias
        if recurse:
            stack += [c for c in m._modules.values() if c is not None]
    return params, nbytes


def module_macs(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[int, dict[str, int]]:
    """Total MACs of one forward and MACs per module path."""
    unseen: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(_shape_macs(path, unseen))
        for path, m in module.named_modules()
        if isinstance(m, (*_SHAPE_COUNTED, _dynamic_linear_type()))
    ]
    from torch.utils.flop_counter import FlopCounterMode  # at first use: up to 0.1 s to import

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in hooks:
            h.remove()
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        path = key.split(".", 1)[1] if "." in key else ""
        per_module[path] = sum(ops.values()) // 2
    extra = 0
    for path, macs in unseen.items():
        if per_module.get(path, 0) == 0:
            extra += macs
            parts = path.split(".")
            for i in range(len(parts) + 1):  # the layer and every module around it
                key = ".".join(parts[:i])
                per_module[key] = per_module.get(key, 0) + macs
    return counter.get_total_flops() // 2 + extra, per_module


_RNN_GATES = {torch.nn.LSTM: 4, torch.nn.GRU: 3, torch.nn.RNN: 1}


def _dynamic_linear_type() -> type:
    from .quant.dynamic import DynamicQuantLinear

    return DynamicQuantLinear


_SHAPE_COUNTED = (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN)


def _shape_macs(path: str, out: dict[str, int]):
    """A forward hook adding the MACs of a layer FlopCounterMode does not count."""

    def hook(mod: torch.nn.Module, args: tuple, result: Any) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        if isinstance(mod, tuple(_RNN_GATES)):
            gates = next(g for cls, g in _RNN_GATES.items() if isinstance(mod, cls))
            steps = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
            dirs = 2 if mod.bidirectional else 1
            h = mod.hidden_size
            out_h = (mod.proj_size or h) if isinstance(mod, torch.nn.LSTM) else h
            total, width = 0, mod.input_size
            for _ in range(mod.num_layers):
                total += dirs * steps * gates * (width * h + out_h * h)
                if isinstance(mod, torch.nn.LSTM) and mod.proj_size:
                    total += dirs * steps * h * mod.proj_size
                width = out_h * dirs
            out[path] = out.get(path, 0) + int(total)
        elif isinstance(mod, _dynamic_linear_type()):
            tokens = x.numel() // x.shape[-1]
            out[path] = out.get(path, 0) + tokens * mod.in_features * mod.out_features

    return hook


def cost_of(graph: Graph) -> Cost:
    """The :class:`Cost` of ``graph`` on its example inputs."""
    total_macs, per_module = module_macs(graph.module, graph.example_inputs)
    layers = []
    seen: set[str] = set()
    for n in graph.module.graph.nodes:
        if n.op != "call_module" or n.target in seen:
            continue
        seen.add(str(n.target))
        mod = graph.module.get_submodule(n.target)
        params, nbytes = _storage(mod, recurse=True)
        meta = node_meta(n)
        layers.append(
            LayerCost(
                str(n.target),
                type(mod).__name__,
                meta.shape,
                params,
                per_module.get(str(n.target), 0),
                nbytes,
            )
        )
    params, nbytes = _storage(graph.module, recurse=True)
    return Cost(params, int(total_macs), nbytes, layers)
