"""Cost analysis: parameters, multiply-accumulates and bytes, in total and per layer.

MACs come from PyTorch's own ``FlopCounterMode`` (one forward on the example inputs, counting
aten convolutions, matmuls and attention): ``MACs = FLOPs / 2``. Bytes are the storage of
parameters and buffers. Registered as the ``"cost"`` analysis, so it is cached on the Graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

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
    other than zero points) count as params; bytes count every parameter and buffer."""
    params = sum(p.numel() for p in module.parameters(recurse=recurse))
    params += sum(
        b.numel()
        for name, b in module.named_buffers(recurse=recurse)
        if b.dtype in _QUANTIZED_STORAGE and "zero_point" not in name
    )
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters(recurse=recurse))
    nbytes += sum(b.numel() * b.element_size() for b in module.buffers(recurse=recurse))
    return params, nbytes


def module_macs(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[int, dict[str, int]]:
    """Total MACs of one forward and MACs per module path."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        path = key.split(".", 1)[1] if "." in key else ""
        per_module[path] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, per_module


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
