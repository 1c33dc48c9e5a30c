"""The ``torch.export`` front end: models fx cannot trace (Hugging Face transformers, most
modern code) captured by ``torch.export`` and **lifted** back to the graph passes read.

``torch.export.export`` yields ATen operations (``aten.linear``, ``aten.view``, ...) and
parameters read by ``get_attr``. Passes read torch-level graphs: ``call_module`` per layer and
torch functions. Lifting rewrites the exported graph into that form:

1. a layer op whose weight is a ``get_attr`` of a module of the matching type, with the same
   configuration, becomes ``call_module`` of that module of the user's (deep-copied) model:
   ``aten.linear`` -> ``nn.Linear``, ``aten.conv{1,2,3}d`` -> ``nn.Conv{1,2,3}d``,
   ``aten.conv_transpose{1,2,3}d`` -> ``nn.ConvTranspose{1,2,3}d``,
   ``aten.batch_norm`` -> ``nn.BatchNorm*``, ``aten.layer_norm`` -> ``nn.LayerNorm``,
   ``aten.embedding`` -> ``nn.Embedding``; the parameters stay owned by their modules;
2. ATen ops with a torch-level equal become it (``aten.add.Tensor`` -> ``operator.add``,
   ``aten.relu_`` -> ``torch.relu`` where nothing else reads the overwritten input,
   ``aten.view`` -> ``Tensor.view``, ``aten.scaled_dot_product_attention`` ->
   ``F.scaled_dot_product_attention``, ...; the table is :data:`FUNCTIONS` / :data:`METHODS`);
   eval-mode dropout and export's shape guards are dropped;
3. everything else stays an ATen call: the channel analysis locks what it does not know, with
   the op's name as the reason.

Each node keeps its module path from export's ``nn_module_stack``. The batch dimension (dim 0
of every input) is exported as dynamic, so the graph runs the calibration and verification
batches of any size; an example batch of 1 is repeated to 2 for the export (torch.export
specialises a size of 1).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from .errors import TraceError, first_line
from .optypes import BATCHNORM, CONV, CONV_T

log = logging.getLogger(__name__)

aten = torch.ops.aten

FUNCTIONS: dict[Any, Callable[..., Any]] = {
    aten.add.Tensor: operator.add,
    aten.sub.Tensor: operator.sub,
    aten.mul.Tensor: operator.mul,
    aten.div.Tensor: operator.truediv,
    aten.relu.default: torch.relu,
    aten.gelu.default: F.gelu,
    aten.silu.default: F.silu,
    aten.tanh.default: torch.tanh,
    aten.sigmoid.default: torch.sigmoid,
    aten.hardtanh.default: F.hardtanh,
    aten.softmax.int: torch.softmax,
    aten.matmul.default: torch.matmul,
    aten.transpose.int: torch.transpose,
    aten.flatten.using_ints: torch.flatten,
    aten.cat.default: torch.cat,
    aten.unsqueeze.default: torch.unsqueeze,
    aten.squeeze.dim: torch.squeeze,
    aten.mean.dim: torch.mean,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.max_pool2d.default: F.max_pool2d,
    aten.avg_pool2d.default: F.avg_pool2d,
}
METHODS: dict[Any, str] = {
    aten.view.default: "view",
    aten.reshape.default: "reshape",
    aten.permute.default: "permute",
    aten.expand.default: "expand",
    aten.contiguous.default: "contiguous",
}
INPLACE: dict[Any, Callable[..., Any]] = {
    aten.relu_.default: torch.relu,
    aten.add_.Tensor: operator.add,
    aten.mul_.Tensor: operator.mul,
    aten.hardtanh_.default: F.hardtanh,
    aten.silu_.default: F.silu,
    aten.hardswish_.default: F.hardswish,
    aten.hardsigmoid_.default: F.hardsigmoid,
}
"""In-place ops lifted to their out-of-place form when nothing else reads the overwritten
input (so the two are equal)."""
_DROPOUT = {aten.dropout.default, aten.feature_dropout.default}
_CONV_T = {
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
}


def export_graph_module(
    model: nn.Module, tensors: list[tuple[str, torch.Tensor]], bound: dict[str, Any]
) -> tuple[fx.GraphModule, list[str]]:
    """Export ``model`` (the caller's deep copy) called with ``tensors`` (by name) and ``bound``
    constants, and lift it. Returns the GraphModule (taking the tensors positionally) and
    the names of its outputs."""
    kwargs = dict(bound)
    batch2 = {n: _batch_of_two(t) for n, t in tensors}
    dims = {n: ({0: torch.export.Dim.AUTO} if t.dim() else None) for n, t in tensors}
    try:
        ep = torch.export.export(
            model, (), {**kwargs, **batch2}, dynamic_shapes={**dims, **{k: None for k in kwargs}}
        )
    except Exception as first:
        log.info("export with a dynamic batch failed (%s); exporting static shapes", first)
        try:
            ep = torch.export.export(model, (), {**kwargs, **dict(tensors)})
        except Exception as e:
            raise TraceError(f"torch.export: {first_line(e)}") from e
    out_spec = ep.call_spec.out_spec
    graph = _unlift(ep, model)
    if graph is None:  # buffers the program mutates, effect tokens, custom objects
        graph = ep.module().graph
    try:
        lifted = lift(graph, model)
    except AttributeError as e:  # a submodule only the program has (higher-order operators:
        # ``torch.no_grad()`` inside forward becomes ``wrap_with_set_grad_enabled(submod_1)``)
        raise TraceError(
            f"torch.export's graph calls {first_line(e)}, which graphopt cannot lift back onto "
            "the model (a torch.no_grad() or autocast region inside forward?)"
        ) from e
    _positional_inputs(lifted, out_spec, [n for n, _ in tensors], bound)
    from .tracing import output_names

    return lifted, output_names(out_spec)


def _unlift(ep: torch.export.ExportedProgram, root: nn.Module) -> fx.Graph | None:
    """The program's graph with its parameters, buffers and tensor constants read by
    ``get_attr`` from ``root`` (the deep copy it was exported from; constants become its
    buffers, so they are counted, copied and saved with it), as ``ep.module()`` does
    but without building and recompiling three intermediate GraphModules (about a fifth of
    the trace time on convnext_tiny). ``None`` when the program needs ``ep.module()``:
    mutated buffers, effect tokens, custom objects, or a constant whose name ``root`` uses."""
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    if any(o.kind != OutputKind.USER_OUTPUT for o in sig.output_specs):
        return None
    state = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    specs = [i for i in sig.input_specs if i.kind != InputKind.USER_INPUT]
    if any(i.kind not in state or i.target is None for i in specs):
        return None
    consts = {i.target: ep.constants.get(i.target) for i in specs if i.kind is state[2]}
    for target, value in consts.items():
        if not isinstance(value, torch.Tensor) or fetch_attr(root, target) is not None:
            return None
    graph = ep.graph_module.graph
    graph.owning_module = root  # the get_attr targets below resolve against root
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for target, value in consts.items():
        owner, _, name = target.rpartition(".")
        (root.get_submodule(owner) if owner else root).register_buffer(name, value)
    for spec in specs:
        node = placeholders[spec.arg.name]
        with graph.inserting_before(node):
            read = graph.get_attr(spec.target)
        read.meta = dict(node.meta)
        node.replace_all_uses_with(read)
        graph.erase_node(node)
    return graph


def fetch_attr(root: nn.Module, target: str) -> Any:
    """``root``'s attribute at the dotted path ``target``, or ``None`` where the path ends."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _batch_of_two(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t


def _positional_inputs(
    lifted: fx.GraphModule, out_spec: Any, names: list[str], bound: dict[str, Any]
) -> None:
    """Make ``forward`` take exactly the tensors, positionally and in ``names`` order (export
    keeps a placeholder for every keyword it was called with); outputs keep their structure."""
    graph = lifted.graph
    old = {str(n.target): n for n in graph.nodes if n.op == "placeholder"}
    missing = [n for n in names if n not in old]
    if missing:  # pragma: no cover - export renamed an input
        raise TraceError(f"torch.export lost the inputs {missing}")
    first = next(iter(graph.nodes))
    for name in names:
        with graph.inserting_before(first):
            new = graph.placeholder(f"{name}__in")
        new.meta = dict(old[name].meta)
        old[name].replace_all_uses_with(new)
    for name, ph in old.items():
        for user in list(ph.users):  # a bound constant read by the computation
            value = bound.get(name)
            user.args = fx.node.map_arg(user.args, lambda n, ph=ph, v=value: v if n is ph else n)
        graph.erase_node(ph)
    for name in names:
        node = next(n for n in graph.nodes if n.op == "placeholder" and n.target == f"{name}__in")
        node.target = node.name = name
    in_spec = pytree.tree_flatten((tuple(range(len(names))), {}))[1]
    lifted.graph._codegen = fx.graph._PyTreeCodeGen(
        fx.graph._PyTreeInfo(list(names), in_spec, out_spec)
    )
    lifted._in_spec = in_spec
    lifted._out_spec = out_spec
    lifted.recompile()


def lift(graph: fx.Graph, root: nn.Module) -> fx.GraphModule:
    """Rewrite the exported (unlifted) ``graph`` into call_module/torch-level form over
    ``root``'s modules."""
    graph.owning_module = root  # call_module targets resolve against root's modules
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        t = node.target
        if t in _DROPOUT and not _get(node.args, 2, False):  # eval-mode dropout: identity
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif t is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
        elif _lift_layer(graph, node, root):
            continue
        elif t in FUNCTIONS:
            node.target = FUNCTIONS[t]
        elif t in INPLACE and isinstance(node.args[0], fx.Node) and len(node.args[0].users) == 1:
            node.target = INPLACE[t]
        elif t in METHODS:
            node.op, node.target = "call_method", METHODS[t]
    for node in list(graph.nodes):  # parameters now read through their modules
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    out = fx.GraphModule(root, graph, class_name=type(root).__name__)
    out.graph.lint()
    return out


def _param_owner(node: Any, root: nn.Module, name: str = "weight") -> tuple[str, nn.Module] | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    path, _, leaf = str(node.target).rpartition(".")
    if leaf != name:
        return None
    try:
        return path, root.get_submodule(path)
    except AttributeError:
        return None


def _bias_ok(arg: Any, path: str, mod: nn.Module) -> bool:
    if mod.bias is None:
        return arg is None
    return isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target == f"{path}.bias"


def _lift_layer(graph: fx.Graph, node: fx.Node, root: nn.Module) -> bool:
    """Replace a layer op by ``call_module`` of the module owning its weight, if it is one."""
    t, a = node.target, node.args
    if t is aten.linear.default:
        owner = _param_owner(a[1], root)
        ok = owner and type(owner[1]) is nn.Linear and _bias_ok(_get(a, 2), *owner)
        x = a[0]
    elif t in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default):
        owner = _param_owner(a[1], root)
        ok = owner and type(owner[1]) in CONV and _bias_ok(_get(a, 2), *owner)
        ok = ok and _conv_matches(owner[1], a)
        x = a[0]
    elif t in _CONV_T:
        owner = _param_owner(a[1], root)
        ok = owner and type(owner[1]) in CONV_T and _bias_ok(_get(a, 2), *owner)
        ok = ok and _conv_transpose_matches(owner[1], a)
        x = a[0]
    elif t is aten.layer_norm.default:
        owner = _param_owner(_get(a, 2), root)
        ok = (
            owner
            and type(owner[1]) is nn.LayerNorm
            and list(a[1]) == list(owner[1].normalized_shape)
            and float(_get(a, 4, 1e-5)) == owner[1].eps
        )
        x = a[0]
    elif t is aten.embedding.default:
        owner = _param_owner(a[0], root)
        ok = owner and type(owner[1]) is nn.Embedding and len(a) <= 3
        x = a[1]
    elif t is aten.batch_norm.default:
        owner = _param_owner(_get(a, 1), root)
        ok = (
            owner
            and type(owner[1]) in BATCHNORM
            and not _get(a, 5, False)
            and float(_get(a, 7, 1e-5)) == owner[1].eps
        )
        x = a[0]
    else:
        return False
    if not ok or node.kwargs:
        return False
    path = owner[0]
    with graph.inserting_before(node):
        new = graph.call_module(path, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return True


def _get(args: tuple, i: int, default: Any = None) -> Any:
    return args[i] if len(args) > i else default


def _tup(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) and len(v) == n else (v,) * n


def _conv_matches(conv: nn.Module, a: tuple) -> bool:
    """``aten.conv*d(x, w, b, stride, padding, dilation, groups)`` is ``conv`` called."""
    n = len(conv.kernel_size)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    return (
        _tup(_get(a, 3, 1), n) == tuple(conv.stride)
        and _tup(_get(a, 4, 0), n) == tuple(conv.padding)
        and _tup(_get(a, 5, 1), n) == tuple(conv.dilation)
        and int(_get(a, 6, 1)) == conv.groups
    )


def _conv_transpose_matches(conv: nn.Module, a: tuple) -> bool:
    """``aten.conv_transpose*d(x, w, b, stride, padding, output_padding, groups, dilation)``
    is ``conv`` called without ``output_size`` (which would change the output padding)."""
    n = len(conv.kernel_size)
    if conv.padding_mode != "zeros":
        return False
    return (
        _tup(_get(a, 3, 1), n) == tuple(conv.stride)
        and _tup(_get(a, 4, 0), n) == tuple(conv.padding)
        and _tup(_get(a, 5, 0), n) == tuple(conv.output_padding)
        and int(_get(a, 6, 1)) == conv.groups
        and _tup(_get(a, 7, 1), n) == tuple(conv.dilation)
    )
