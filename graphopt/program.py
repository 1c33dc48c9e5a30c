"""Models saved without pickle: graphopt writes an optimized model as a ``torch.export``
program (``model.pt2``) and reads ``.pt2`` files back as modules passes can work on.

Why: ``torch.save(module)`` pickles Python objects, and unpickling one runs whatever code the
file names, so graphopt never unpickles a model unless the user says they trust the file. A
``.pt2`` holds an ATen graph (serialised as data) and tensors, and loads with
``torch.export.load`` without running code from the file. Plain PyTorch reads it too:
``torch.export.load("model.pt2").module()``.

Reading a program back, :func:`load_program` gives an ``fx.GraphModule`` in graphopt's
torch-level form, so a saved model can be compressed again: every ``aten.linear``/``conv``/
``layer_norm``/``embedding``/``batch_norm`` whose parameters sit at one module path becomes an
``nn.Linear``/``nn.ConvNd``/... there (built from the weights' shapes and the op's arguments),
then :func:`graphopt.export_frontend.lift` turns ATen calls into module calls and torch
functions as it does for the export front end.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .atomic import atomic_path
from .capture import output_to_log
from .errors import GraphoptError, ModelSpecError, first_line
from .export_frontend import fetch_attr, lift
from .graph import PROGRAM_META

log = logging.getLogger(__name__)

aten = torch.ops.aten
SUFFIX = ".pt2"


def save_program(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    """Export ``module`` called on ``example_inputs`` (batch dimension dynamic where it can be)
    and write it atomically to ``path`` with ``torch.export.save``."""
    batch2 = tuple(_batch_of_two(t) for t in example_inputs)
    dims = tuple({0: torch.export.Dim.AUTO} if t.dim() else None for t in example_inputs)
    try:
        with output_to_log("torch.export"):
            ep = _export(module, tuple(example_inputs), batch2, dims)
    except Exception as e:
        raise GraphoptError(
            f"cannot save the optimized model as a torch.export program: {first_line(e)}"
        ) from e
    with atomic_path(path, suffix=SUFFIX) as tmp:  # torch.export.save wants a .pt2 name
        torch.export.save(ep, str(tmp))


def _export(module: nn.Module, inputs: tuple, batch2: tuple, dims: tuple):
    try:
        return torch.export.export(module, batch2, dynamic_shapes=dims)
    except Exception as first:
        log.info("export with a dynamic batch failed (%s); saving static shapes", first)
        return torch.export.export(module, inputs)


def _batch_of_two(t: torch.Tensor) -> torch.Tensor:
    """torch.export specialises a size of 1; export a batch of two so dim 0 stays dynamic."""
    return torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t


def load_program(path: str | os.PathLike) -> fx.GraphModule:
    """The program in ``path`` as a torch-level ``GraphModule`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"model file {str(path)!r} does not exist")
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise ModelSpecError(
            f"cannot load {str(path)!r} as a torch.export program: {type(e).__name__}: "
            f"{first_line(e)}"
        ) from e
    gm = ep.module()
    _constants_as_buffers(gm)
    rebuilt = rebuild_layers(gm)
    log.info("%s: rebuilt %d layers as modules", path, rebuilt)
    out = lift(gm.graph, gm).eval()
    out.meta[PROGRAM_META] = str(path)
    return out


def _constants_as_buffers(gm: fx.GraphModule) -> None:
    """Export keeps tensors that are not parameters (a quantized layer's int8 weights) as plain
    attributes; register them as buffers so they are counted, copied and saved with the model."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        path, _, leaf = str(node.target).rpartition(".")
        owner = gm.get_submodule(path) if path else gm
        value = getattr(owner, leaf, None)
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            if leaf not in owner._buffers:
                delattr(owner, leaf)
                owner.register_buffer(leaf, value)


def rebuild_layers(gm: fx.GraphModule) -> int:
    """Give each layer op's parameters a module of the layer's type at their path (in place);
    returns how many were built. A path whose parameters several ops read, or that already
    holds a typed module, is left alone."""
    readers: dict[str, int] = {}
    plans: list[tuple[str, nn.Module]] = []
    for node in gm.graph.nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                owner = str(arg.target).rpartition(".")[0]
                readers[owner] = readers.get(owner, 0) + 1
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        built = _layer_for(gm, node)
        if built is not None:
            plans.append(built)
    count = 0
    for path, layer in plans:
        old = gm.get_submodule(path)
        if type(old) is not nn.Module:
            continue  # already a typed module (or the root)
        names = {n for n, _ in old.named_parameters(recurse=False)}
        names |= {n for n, _ in old.named_buffers(recurse=False)}
        if readers.get(path, 0) != len(names & {"weight", "bias", "running_mean", "running_var"}):
            continue  # another op reads these parameters: keep the ATen form
        for name, child in old.named_children():
            layer.add_module(name, child)
        for name, buf in old.named_buffers(recurse=False):
            if not hasattr(layer, name) or getattr(layer, name) is None:
                layer.register_buffer(name, buf)
        parent, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, layer)
        count += 1
    return count


def _attr(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    return fetch_attr(gm, str(node.target))


def _arg(node: fx.Node, i: int, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else default


def _owner(node: Any, leaf: str) -> str | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    path, _, name = str(node.target).rpartition(".")
    return path if name == leaf and path else None


def _layer_for(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    """``(path, module)`` for a layer op whose weight is a parameter at ``path.weight``."""
    t = node.target
    if t is aten.linear.default:
        w, b, path = (
            _attr(gm, node.args[1]),
            _attr(gm, _arg(node, 2)),
            _owner(node.args[1], "weight"),
        )
        if path is None or not isinstance(w, nn.Parameter) or w.dim() != 2:
            return None
        layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    elif t in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default):
        w, b, path = (
            _attr(gm, node.args[1]),
            _attr(gm, _arg(node, 2)),
            _owner(node.args[1], "weight"),
        )
        if path is None or not isinstance(w, nn.Parameter) or isinstance(_arg(node, 4, 0), str):
            return None
        groups = int(_arg(node, 6, 1))
        cls = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[w.dim()]
        layer = cls(
            w.shape[1] * groups,
            w.shape[0],
            tuple(w.shape[2:]),
            stride=_arg(node, 3, 1),
            padding=_arg(node, 4, 0),
            dilation=_arg(node, 5, 1),
            groups=groups,
            bias=b is not None,
        )
    elif t is aten.layer_norm.default:
        w, b = _attr(gm, _arg(node, 2)), _attr(gm, _arg(node, 3))
        path = _owner(_arg(node, 2), "weight")
        if path is None or b is None:
            return None
        layer = nn.LayerNorm(list(node.args[1]), eps=float(_arg(node, 4, 1e-5)))
    elif t is aten.embedding.default:
        w, b, path = _attr(gm, node.args[0]), None, _owner(node.args[0], "weight")
        if path is None or not isinstance(w, nn.Parameter) or len(node.args) > 3:
            return None
        pad = int(_arg(node, 2, -1))
        layer = nn.Embedding(w.shape[0], w.shape[1], padding_idx=None if pad < 0 else pad)
    elif t is aten.batch_norm.default:
        w, b = _attr(gm, _arg(node, 1)), _attr(gm, _arg(node, 2))
        path = _owner(_arg(node, 1), "weight")
        mean, var = _attr(gm, _arg(node, 3)), _attr(gm, _arg(node, 4))
        rank = len(node.args[0].meta["val"].shape) if "val" in node.args[0].meta else 0
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
        if path is None or None in (b, mean, var, cls) or _arg(node, 5, False):
            return None
        layer = cls(w.shape[0], eps=float(_arg(node, 7, 1e-5)), momentum=_arg(node, 6, 0.1))
        layer.running_mean, layer.running_var = mean, var
    else:
        return None
    layer.weight = w
    if b is not None:
        layer.bias = b
    return path, layer
