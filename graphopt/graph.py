"""The Graph: a torch.fx ``GraphModule`` plus the example inputs it was traced with, typed
per-node metadata and a cache of analyses.

Node metadata lives in ``node.meta["graphopt"]`` as a :class:`NodeMeta`; passes read and
extend it (a fusion appends the fused module's path to ``provenance``) instead of setting
ad-hoc attributes on nodes.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.fx as fx

T = TypeVar("T")

PIPELINE_META = "graphopt.pipeline"
"""``GraphModule.meta`` key: the pipeline texts that made this graph (the ONNX export keeps it)."""
TRACE_META = "graphopt.trace"
PROGRAM_META = "graphopt.program"  # GraphModule.meta key: loaded from a .pt2 program
"""``GraphModule.meta`` key: the trace report (front end, input names, bound defaults, leaves)."""

log = logging.getLogger(__name__)

META_KEY = "graphopt"


@dataclass
class TensorInfo:
    """Shape and dtype of one tensor value."""

    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorInfo:
        return cls(tuple(int(s) for s in t.shape), str(t.dtype).replace("torch.", ""))


@dataclass
class NodeMeta:
    """What graphopt knows about one FX node.

    ``outputs`` holds one :class:`TensorInfo` per tensor the node produces (a tuple-returning
    node has several, a non-tensor node none). ``module_path`` is the path of the user's module
    that created the node (for ``call_module`` its target, otherwise the innermost module whose
    ``forward`` made the call). ``provenance`` lists the original module paths merged into this
    node by fusions; ``leaf`` marks opaque leaf modules whose channels passes must not touch.
    """

    module_path: str | None = None
    module_type: str | None = None
    outputs: list[TensorInfo] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)
    leaf: bool = False
    source: str | None = None
    container: bool = False

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self.outputs[0].shape if len(self.outputs) == 1 else None

    @property
    def dtype(self) -> str | None:
        return self.outputs[0].dtype if len(self.outputs) == 1 else None


def modules_by_path(root: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every submodule of ``root`` by dotted path (a shared one under each of its paths): one
    walk, for code that would otherwise call ``get_submodule`` once per node or parameter."""
    return dict(root.named_modules(remove_duplicate=False))


def find_module(
    root: torch.nn.Module, modules: dict[str, torch.nn.Module], path: str
) -> torch.nn.Module:
    """``modules[path]`` (``modules`` from :func:`modules_by_path` of ``root``), else what
    ``root.get_submodule(path)`` gives: a module added since, or its error naming the path."""
    mod = modules.get(path)
    return mod if mod is not None else root.get_submodule(path)


def code_state(graph: fx.Graph) -> list[tuple[Any, ...]]:
    """What ``graph``'s generated code depends on: each node, its op, target and arguments in
    order (fx keeps arguments in immutable containers), so equal states give equal code and a
    pass that only changed parameters needs no recompile."""
    return [(n, n.op, n.target, n.args, n.kwargs) for n in graph.nodes]


def node_meta(node: fx.Node) -> NodeMeta:
    """The :class:`NodeMeta` of ``node``, created empty if a pass added the node without one."""
    meta = node.meta.get(META_KEY)
    if meta is None:
        meta = NodeMeta()
        node.meta[META_KEY] = meta
    return meta


class Graph:
    """A traced model that passes rewrite in place.

    Attributes:
        module: the ``torch.fx.GraphModule``; runnable like the original model.
        example_inputs: the tuple of tensors it was traced and shape-propagated with.
    """

    def __init__(self, module: fx.GraphModule, example_inputs: Iterable[torch.Tensor]):
        self.module = module
        self.example_inputs = tuple(example_inputs)
        self._analyses: dict[Callable[[Graph], Any], Any] = {}
        self._example_outputs: tuple[tuple, Any] | None = None
        self.compiled_state: list[tuple[Any, ...]] | None = None
        """The :func:`code_state` the module's code was last generated from, when known (the
        pass manager sets it before each pass and :meth:`recompile` after it recompiles), so
        the manager skips a second recompile; ``None`` when unknown."""

    @property
    def trace_report(self) -> dict[str, Any]:
        """How the model was traced: ``frontend``, ``inputs`` (names, in call order), ``bound``
        (parameters fixed to constants) and ``auto_leaves`` (module, reason, source line)."""
        return self.module.meta.get(TRACE_META, {})

    # -- running -------------------------------------------------------------------------------
    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self.module(*inputs)

    @property
    def fx_graph(self) -> fx.Graph:
        return self.module.graph

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.module.graph.nodes)

    def node(self, name: str) -> fx.Node:
        for n in self.module.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the graph")

    def meta(self, node: fx.Node) -> NodeMeta:
        return node_meta(node)

    def submodule(self, path: str) -> torch.nn.Module:
        return self.module.get_submodule(path)

    # -- keeping the module consistent ------------------------------------------------------------
    def recompile(self) -> None:
        """Lint the FX graph and regenerate the module's code."""
        self.module.graph.lint()
        self.module.recompile()
        if self.compiled_state is not None:
            self.compiled_state = code_state(self.module.graph)

    def propagate_shapes(self, inputs: tuple[torch.Tensor, ...] | None = None) -> Any:
        """Run the module once on ``inputs`` (the example inputs by default), recording every
        node's output shapes and dtypes in its :class:`NodeMeta`.

        Returns the module's outputs, computed as the pass manager's verification computes
        them (no autograd, the RNG seeded with 0 and restored after), so the manager reuses
        this run instead of running the model a second time (:meth:`example_outputs`)."""
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = _run_recording(self.module, inputs if inputs is not None else self.example_inputs)
        if inputs is None:
            self._example_outputs = (self._state_token(), detach_outputs(out))
        return out

    def adopt_trace_values(self, key: str, outputs: tuple[Any, ...]) -> None:
        """What :meth:`propagate_shapes` records, taken from a trace that computed every value
        already: each node's ``meta[key]`` holds its :func:`value_info` (the key is dropped),
        ``outputs`` the output node's values on the example inputs."""
        out_node = None
        for node in self.module.graph.nodes:
            meta = node_meta(node)
            if node.op == "output":
                out_node = node
                continue
            meta.outputs, meta.container = node.meta.pop(key, ([], False))
        if out_node is not None:
            meta = node_meta(out_node)
            meta.outputs, meta.container = value_info(outputs)
        out = self.module.graph.process_outputs(outputs)
        self._example_outputs = (self._state_token(), detach_outputs(out))

    def example_outputs(self) -> Any:
        """The outputs on the example inputs of the last :meth:`propagate_shapes`, if the module
        is still in the state that run saw, else ``None``.

        The state is the generated code, every module's training flag and plain settings
        (numbers, strings and tuples of them: stride, eps, ...), and each parameter's, buffer's
        and example input's identity, storage, version counter and sum (the sum catches
        in-place writes through ``.data``, which bump no version counter)."""
        if self._example_outputs is None:
            return None
        token, out = self._example_outputs
        return out if token == self._state_token() else None

    def _state_token(self) -> tuple:
        gm = self.module
        flags: list[Any] = []
        tensors: list[torch.Tensor] = [
            t for t in self.example_inputs if isinstance(t, torch.Tensor)
        ]
        stack = [gm]
        while stack:  # a plain walk: named_modules' nested generators cost ~0.1 s on 300 modules
            m = stack.pop()
            flags.append(m.training)
            # plain settings (stride, padding, eps, p, ...); hooks and the rest start with "_"
            flags += [(k, v) for k, v in m.__dict__.items() if k[0] != "_" and _plain(v)]
            tensors += [t for t in m._parameters.values() if t is not None]
            tensors += [t for t in m._buffers.values() if t is not None]
            stack += [c for c in m._modules.values() if c is not None]
        try:
            with torch.no_grad():
                state = tuple(  # plain ints and floats: the collector stops tracking it
                    (id(t), t.data_ptr(), t._version, float(t.sum()) if t.numel() else 0, *t.shape)
                    for t in tensors
                )
        except Exception:  # a tensor without storage (meta, fake): never reuse
            return (object(),)
        return (gm.code, tuple(flags), state)

    # -- analyses -----------------------------------------------------------------------------------
    def cached(self, analysis: Callable[[Graph], T]) -> T:
        """``analysis(self)``, computed once and kept until :meth:`invalidate` (the manager
        invalidates after every pass that modified the graph)."""
        if analysis not in self._analyses:
            self._analyses[analysis] = analysis(self)
        return self._analyses[analysis]

    def invalidate(self) -> None:
        """Drop every cached analysis (the graph changed)."""
        self._analyses.clear()

    # -- copying ----------------------------------------------------------------------------------
    def copy(self) -> Graph:
        """A deep copy: module, parameters, node metadata; analyses are not copied."""
        gm = copy.deepcopy(self.module)
        for n in gm.graph.nodes:  # FX copies node.meta shallowly; NodeMeta must not be shared
            if META_KEY in n.meta:
                n.meta[META_KEY] = copy.deepcopy(n.meta[META_KEY])
        return Graph(gm, tuple(t.clone() for t in self.example_inputs))

    def __repr__(self) -> str:
        n = sum(1 for _ in self.module.graph.nodes)
        return f"Graph({type(self.module).__name__}, {n} nodes)"


def _run_recording(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> Any:
    """Run ``gm``'s graph node by node on ``inputs``, recording each node's output shapes and
    dtypes in its :class:`NodeMeta`; values are dropped after their last use.

    What ``fx.Interpreter`` does, in one loop: its per-node context managers and argument
    plumbing cost 20-40% on top of the module's own forward (efficientnet_b0: 50 against
    30 ms). A failing node raises a one-line :class:`~graphopt.errors.DataError` naming it."""
    nodes = list(gm.graph.nodes)
    last_use: dict[fx.Node, list[fx.Node]] = {}
    seen: set[fx.Node] = set()
    for node in reversed(nodes):
        for used in node._input_nodes:
            if used not in seen:
                seen.add(used)
                last_use.setdefault(node, []).append(used)
    modules = dict(gm.named_modules())
    env: dict[fx.Node, Any] = {}
    get = env.__getitem__
    args = iter(gm.graph.process_inputs(*inputs))
    for node in nodes:
        op = node.op
        try:
            if op == "placeholder":
                if str(node.target).startswith("*"):
                    value: Any = list(args)
                else:
                    value = next(args, _NO_INPUT)
                    if value is _NO_INPUT:
                        if not node.args:
                            raise TypeError(f"missing input {node.target!r}")
                        value = node.args[0]  # the parameter's default
            elif op == "get_attr":
                value = operator.attrgetter(node.target)(gm)
            elif op == "output":
                value = fx.node.map_arg(node.args[0], get)
            else:
                a, k = fx.node.map_arg(node.args, get), fx.node.map_arg(node.kwargs, get)
                if op == "call_module":
                    value = modules[node.target](*a, **k)
                elif op == "call_function":
                    value = node.target(*a, **k)
                else:  # call_method
                    value = getattr(a[0], node.target)(*a[1:], **k)
        except Exception as e:
            from .errors import DataError

            meta = node_meta(node)
            where = f" (module {meta.module_path!r})" if meta.module_path else ""
            shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
            raise DataError(
                f"node {node.name!r}{where} failed on inputs of shape {shapes}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                "check the input shape (CLI: --input-shape)"
            ) from e
        env[node] = value
        meta = node_meta(node)
        meta.outputs, meta.container = value_info(value)
        if op == "output":
            return gm.graph.process_outputs(value)
        for used in last_use.get(node, ()):
            del env[used]
    raise ValueError("the graph has no output node")


_NO_INPUT = object()


def _plain(v: Any) -> bool:
    """A number, string, bool or None, or a tuple of them."""
    if isinstance(v, tuple):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def detach_outputs(out: Any) -> Any:
    """A detached copy of a model's outputs (tensors cloned; tuples, lists, named tuples and
    dicts rebuilt)."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (list, tuple)):
        vals = [detach_outputs(o) for o in out]
        return type(out)(*vals) if hasattr(out, "_fields") else type(out)(vals)
    if isinstance(out, dict):
        return {k: detach_outputs(v) for k, v in out.items()}
    return out


def value_info(value: Any) -> tuple[list[TensorInfo], bool]:
    """What :class:`NodeMeta` records of a node's value: one :class:`TensorInfo` per tensor it
    is or holds, and whether it is a container (list or tuple)."""
    return [TensorInfo.of(t) for t in _tensors_in(value)], isinstance(value, (list, tuple))


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        out: list[torch.Tensor] = []
        for v in value:
            if isinstance(v, torch.Tensor):
                out.append(v)
        return out
    return []
