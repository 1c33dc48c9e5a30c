"""fx tracing with concrete values: every proxy carries what the example inputs make of it.

Plain ``torch.fx`` symbolic tracing stops at the first Python decision on a traced value:
``if seq_len > 1``, ``range(n)``, ``len(x)``, decorators that look inside ``**kwargs``. Hugging
Face models are full of these. This tracer runs the model's Python code once on proxies that
also hold the value each operation computes on the example inputs, as Hugging Face's former
``HFTracer`` did with meta tensors. A decision on a proxy takes the example's branch and is
listed in ``specialized``; every tensor operation stays in the graph. As in ``torch.export``
with a dynamic batch, the sizes the batch does not change are written into the graph as
numbers after the trace, and the arithmetic on the batch size stays in it.

**The batch stays free, or the trace refuses.** Each proxy also carries its value at a batch
one larger (``alt``), computed on ``meta`` tensors (shapes only, no arithmetic). A decision
whose outcome differs between the two batches (``x.view(int(b), -1)``, ``if b == 1``) would
tie the graph to the example's batch: the trace raises :class:`~graphopt.errors.TraceError`,
and :func:`graphopt.trace` falls back to ``torch.export``. So does a decision on a value
computed from the *numbers* of an input (``if mask.all():``): the graph would be right for
the example only.

The values cost one eager forward of the model. They also give every node's output shape
(what :meth:`Graph.propagate_shapes` would run the graph again for) and the example outputs
the pass manager verifies against.
"""

from __future__ import annotations

import inspect
import itertools
import operator
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import TraceError
from .graph import value_info
from .tracing import _INTERNAL_DIRS, LeafSpec, _Proxy, _Tracer

_STATIC_ATTRS = frozenset({"dtype", "device", "is_cuda", "layout", "requires_grad", "ndim"})
"""Tensor attributes returned as plain values (no node): no input changes them."""
_STATIC_METHODS = frozenset(
    {"dim", "ndimension", "is_floating_point", "is_complex", "get_device", "element_size"}
)
_SHAPE_ATTRS = frozenset({"shape"})
_SHAPE_METHODS = frozenset({"size", "numel", "nelement"})

CONSTANT = "graphopt_constant"
"""``node.meta`` key of an int the batch does not change (a size other than the batch's)."""
INFO = "graphopt_concrete"
"""``node.meta`` key of the node's output shapes on the example inputs."""
DATA = 1
"""A value's flag: computed from the numbers of an input tensor (not only its shape)."""
UNKNOWN = object()
"""The alternative-batch value of an operation ``meta`` tensors cannot run."""


class ConcreteProxy(_Proxy):
    """A proxy with its value on the example inputs (``value``), at a batch one larger
    (``alt``), and whether it depends on input data (``flags``)."""

    value: Any
    alt: Any
    flags: int

    def __getattr__(self, k: str) -> Any:
        if k in ("value", "alt", "flags") or k.startswith("__"):
            raise AttributeError(k)
        v = getattr(self.value, k)
        if k in _STATIC_ATTRS:
            return v
        if callable(v):
            return _Method(self, k)
        return self.tracer.create_proxy("call_function", getattr, (self, k), {})

    def __bool__(self) -> bool:
        return self.tracer.decide(self, "bool", bool)

    def __index__(self) -> int:
        return self.tracer.decide(self, "int", operator.index)

    def __int__(self) -> int:
        return self.tracer.decide(self, "int", int)

    def __float__(self) -> float:
        return self.tracer.decide(self, "float", float)

    def __len__(self) -> int:
        return self.tracer.decide(self, "len", len)

    def __contains__(self, item: Any) -> bool:
        return self.tracer.decide(self, "in", lambda v: item in v)

    def __iter__(self):
        n = self.tracer.decide(self, "iteration", len)
        return iter([self[i] for i in range(n)])


class _Method:
    """``proxy.method`` before it is called: the call is recorded as ``call_method``."""

    def __init__(self, proxy: ConcreteProxy, name: str):
        self.proxy, self.name = proxy, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.proxy.tracer.create_proxy("call_method", self.name, (self.proxy, *args), kwargs)


class ConcreteTracer(_Tracer):
    """The tracer. ``inputs`` maps each input's name to its example tensor (the model is
    called with them by keyword, in this order), ``bound`` holds keyword constants;
    ``leaf_modules`` as in :func:`graphopt.trace`."""

    def __init__(
        self,
        inputs: dict[str, torch.Tensor],
        bound: dict[str, Any],
        leaf_modules: Sequence[LeafSpec] = (),
    ):
        super().__init__(leaf_modules)
        self.proxy_buffer_attributes = True  # buffers read in forward become get_attr nodes
        self.inputs = inputs
        self.bound = bound
        self.specialized: list[str] = []
        self._computing = 0
        self._meta: dict[int, torch.Tensor] = {}
        self._keep: list[torch.Tensor] = []  # the sources of _meta's entries, while tracing
        self.out_spec: Any = None

    # -- proxies carry values ------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def create_proxy(
        self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None
    ):
        if kind == "call_function" and target is getattr and args[1] in _STATIC_ATTRS:
            return getattr(_value(args[0]), args[1])
        if kind == "call_method" and target in _STATIC_METHODS:
            a, kw, _ = _unpack(args, kwargs)
            return getattr(a[0], target)(*a[1:], **kw)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, ConcreteProxy):
            self._computing += 1
            try:
                proxy.value, proxy.alt, proxy.flags = self._evaluate(kind, target, args, kwargs)
            finally:
                self._computing -= 1
            proxy.node.meta[INFO] = value_info(proxy.value)
            if type(proxy.value) is int and not proxy.flags and proxy.alt == proxy.value:
                proxy.node.meta[CONSTANT] = proxy.value  # folded after the trace
            if type(proxy.value) is torch.Size:
                # a plain tuple of one proxy (or number) per dim, as torch.export has them:
                # shapes built by tuple arithmetic (``(-1,) + x.shape[1:]``) then reach
                # ``view`` as a list of dims, each with its own provenance
                return tuple(proxy[i] for i in range(len(proxy.value)))
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> tuple[Any, Any, int]:
        if kind == "placeholder":
            t = self.inputs[target]
            if not t.dim():
                return t, t, DATA
            alt = torch.empty((t.shape[0] + 1, *t.shape[1:]), dtype=t.dtype, device="meta")
            return t, alt, DATA
        if kind == "get_attr":
            value = operator.attrgetter(target)(self.root)
            return value, value, 0
        a, kw, flags = _unpack(args, kwargs)
        if kind != "call_module" and _writes(target, kw) and _is_parameter(a[0] if a else None):
            raise TraceError(
                f"{_name(target)} writes into a parameter in place at {_user_line()}; the "
                "concrete tracer runs forward on weights it shares with your model"
            )
        if (kind == "call_function" and target is getattr and args[1] in _SHAPE_ATTRS) or (
            kind == "call_method" and target in _SHAPE_METHODS
        ):
            flags = 0  # a shape is known without the data
        if kind == "call_function":
            fn = target
        elif kind == "call_method":
            fn = getattr(type(a[0]), target)
        elif kind == "call_module":
            fn = self.root.get_submodule(target)
        else:  # pragma: no cover - the output node is made by create_node
            raise AssertionError(kind)
        value = fn(*a, **kw)
        return value, self._alternative(fn, a, kw, args, kwargs, value), flags

    def _alternative(
        self, fn: Any, real: tuple, real_kw: dict, args: tuple, kwargs: dict, value: Any
    ) -> Any:
        """``fn`` on the alternative-batch values, every tensor on ``meta``. Elementwise
        operations and the common layers take a shape rule instead (``meta`` runs most
        elementwise operations through Python references, about 0.3 ms each), where the rule
        gives the example's own output shape from the example's inputs."""
        try:
            a, kw = _map(self._alt, args), _map(self._alt, kwargs)
        except _Unknown:
            return UNKNOWN
        try:
            if isinstance(value, torch.Tensor):
                shape = _rule_shape(fn, a, kw)
                if shape is not None and _rule_shape(fn, real, real_kw) == value.shape:
                    return torch.empty(shape, dtype=value.dtype, device="meta")
            if isinstance(fn, torch.nn.Module):
                state = {k: self._to_meta(v) for k, v in _state(fn)}
                return torch.func.functional_call(fn, state, a, kw, strict=False)
            return fn(*a, **kw)
        except Exception:
            return UNKNOWN

    def _alt(self, a: Any) -> Any:
        if isinstance(a, ConcreteProxy):
            a = a.alt
            if a is UNKNOWN:
                raise _Unknown
        return self._to_meta(a) if isinstance(a, torch.Tensor) else a

    def _to_meta(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "meta":
            return t
        meta = self._meta.get(id(t))
        if meta is None:  # kept with its source, so the id is not reused while traced
            meta = self._meta[id(t)] = t.to("meta")
            self._meta[id(meta)] = meta
            self._keep.append(t)
        return meta

    # -- fx's patches are off while values are computed ----------------------------------
    def call_module(self, m, forward, args, kwargs):
        if self._computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # -- decisions ---------------------------------------------------------------------
    def decide(self, proxy: ConcreteProxy, what: str, fn: Any) -> Any:
        """``fn(value)`` for a Python decision on ``proxy``; refuses when the outcome depends
        on input data or on the batch size."""
        where = _user_line()
        if proxy.flags & DATA and what not in ("len", "iteration"):  # a length is a shape's
            raise TraceError(
                f"{what} of {proxy.node.name}, a value computed from the inputs' numbers, "
                f"decides control flow at {where}"
            )
        out = fn(proxy.value)
        if what in ("len", "iteration") and isinstance(proxy.value, tuple):
            return out  # a shape's length is its rank
        alt = UNKNOWN if proxy.alt is UNKNOWN else _try(fn, proxy.alt)
        if alt is UNKNOWN or not _same(out, alt):
            raise BatchSpecialized(
                f"{what} of {proxy.node.name} ({_short(proxy.value)}) depends on the batch "
                f"size at {where}; the graph would only run at the example's batch"
            )
        self.specialized.append(f"{what} of {proxy.node.name} = {_short(out)} at {where}")
        return out

    # -- the root's arguments and outputs ---------------------------------------------------
    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        names, bound = list(self.inputs), self.bound

        def call(*args: Any) -> Any:
            root, tensors = (args[0], args[1:]) if is_module else (None, args)
            kw = dict(zip(names, tensors))
            kw.update(bound)
            out = root_fn(root, **kw) if is_module else root_fn(**kw)
            leaves, self.out_spec = pytree.tree_flatten(out)
            self.outputs = tuple(_value(v) for v in leaves)
            return tuple(leaves)

        placeholders = [self.create_proxy("placeholder", n, (), {}) for n in names]
        return call, ([self.root] if is_module else []) + placeholders

    def trace(self, root, concrete_args=None):  # noqa: D102 - fx's
        self._keep = []
        saved = {n: getattr(torch, n) for n in _FACTORIES}
        try:
            for n, fn in saved.items():
                setattr(torch, n, self._factory(fn))
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # as the pass manager's verification runs
                return super().trace(root, concrete_args)
        finally:
            for n, fn in saved.items():
                setattr(torch, n, fn)
            self._meta.clear()
            self._keep = []

    def _factory(self, fn: Any) -> Any:
        """``fn`` (``torch.ones``, ...) recorded when a size is a proxy: torch's argument
        parser does not hand ``ones(b, n)`` with a proxy ``b`` to ``__torch_function__``."""

        def factory(*args: Any, **kwargs: Any) -> Any:
            if _has_proxy(args) or _has_proxy(kwargs):
                return self.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        factory.__wrapped__ = fn  # type: ignore[attr-defined]
        return factory


def concrete_graph_module(
    root: torch.nn.Module,
    tensors: list[tuple[str, torch.Tensor]],
    bound: dict[str, Any],
    leaf_modules: Sequence[LeafSpec] = (),
    class_name: str = "GraphModule",
) -> tuple[fx.GraphModule, ConcreteTracer]:
    """Trace ``root`` called with ``tensors`` (by keyword, in order) and the ``bound``
    constants. The GraphModule takes the tensors positionally and returns the model's output
    structure (``ModelOutput``, dict, tuple) rebuilt from its leaves; the tracer holds
    ``specialized``, ``user_leaves``, ``out_spec`` and ``outputs`` (the example's output
    leaves)."""
    tracer = ConcreteTracer(dict(tensors), bound, leaf_modules)
    try:
        graph = tracer.trace(root)
    except Exception as e:
        e.failed_path = tracer.failed_path  # type: ignore[attr-defined]
        raise
    names = [n for n, _ in tensors]
    in_spec = pytree.tree_flatten((tuple(range(len(names))), {}))[1]
    graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(names, in_spec, tracer.out_spec))
    _fold_constants(graph)
    _drop_unused(graph)
    gm = fx.GraphModule(tracer.root, graph, class_name=class_name)
    gm._in_spec, gm._out_spec = in_spec, tracer.out_spec
    return gm, tracer


_PURE_FUNCTIONS = {
    getattr,
    *(
        getattr(operator, n)
        for n in "getitem add sub mul truediv floordiv mod neg eq ne lt le gt ge not_".split()
    ),
}
_PURE_METHODS = {"size", "dim", "numel"}


def _fold_constants(graph: fx.Graph) -> None:
    """Write every size the batch does not change into its users as a number, so the graph
    has torch.export's form (only the batch is free) and shape rules read plain ints. Tracing
    kept them as proxies until now: a tensor built from a constant size would otherwise be a
    constant, and a method of it called with the batch (``pos.expand(b, -1)``) untraceable."""
    for node in graph.nodes:
        value = node.meta.pop(CONSTANT, None)
        if value is None:
            continue
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n, v=value, s=node: v if n is s else n)
            user.kwargs = fx.node.map_arg(
                user.kwargs, lambda n, v=value, s=node: v if n is s else n
            )


def _drop_unused(graph: fx.Graph) -> None:
    """Erase the unused results of side-effect-free operations: the dims of shapes no one
    read, the comparisons whose outcome became a Python decision. (fx's own dead-code
    elimination would also drop an unused ``x.add_(1)``.)"""
    for node in reversed(list(graph.nodes)):
        if node.users:
            continue
        if (
            (node.op == "call_function" and node.target in _PURE_FUNCTIONS)
            or (node.op == "call_method" and node.target in _PURE_METHODS)
            or node.op == "get_attr"
        ):
            graph.erase_node(node)


_ELEMENTWISE = {
    *(
        getattr(operator, n)
        for n in "add sub mul truediv floordiv mod pow neg pos eq ne lt le gt ge and_ or_ xor invert".split()
    ),
    *(
        getattr(torch, n)
        for n in "add sub mul div pow neg exp log tanh sigmoid relu erf sqrt rsqrt abs where masked_fill clamp softmax log_softmax dropout".split()
    ),
    *(
        getattr(torch.nn.functional, n)
        for n in "gelu relu silu tanh sigmoid hardtanh hardswish hardsigmoid mish elu leaky_relu softmax log_softmax dropout".split()
    ),
}
"""Functions whose output shape is the broadcast of their tensor arguments' shapes."""
_ELEMENTWISE_METHODS = {
    getattr(torch.Tensor, n)
    for n in "add sub mul div pow neg exp log tanh sigmoid relu sqrt rsqrt abs masked_fill clamp softmax log_softmax float half to contiguous __add__ __sub__ __mul__ __truediv__ __radd__ __rmul__ __rsub__ __rtruediv__".split()
}
_SAME_SHAPE_MODULES = (
    torch.nn.Dropout,
    torch.nn.LayerNorm,
    torch.nn.GELU,
    torch.nn.ReLU,
    torch.nn.SiLU,
    torch.nn.Tanh,
    torch.nn.Sigmoid,
    torch.nn.Identity,
    torch.nn.Softmax,
)


def _rule_shape(fn: Any, a: tuple, kw: dict) -> tuple[int, ...] | None:
    """The output shape of ``fn(*a, **kw)`` from its inputs' shapes, for the operations whose
    rule is plain; ``None`` for the rest."""
    if fn in _ELEMENTWISE or fn in _ELEMENTWISE_METHODS:
        if fn is torch.Tensor.to and any(isinstance(x, torch.Tensor) for x in a[1:]):
            return None
        shapes = [x.shape for x in (*a, *kw.values()) if isinstance(x, torch.Tensor)]
        return _broadcast(shapes) if shapes else None
    t = type(fn)
    if t is torch.nn.Linear and len(a) == 1 and not kw:
        return (*a[0].shape[:-1], fn.out_features)
    if t is torch.nn.Embedding and len(a) == 1 and not kw:
        return (*a[0].shape, fn.embedding_dim)
    if t in _SAME_SHAPE_MODULES and len(a) == 1 and not kw:
        return tuple(a[0].shape)
    return None


class BatchSpecialized(TraceError):
    """A Python decision in ``forward`` depends on the batch size."""


class _Unknown(Exception):
    pass


def _state(m: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(m.named_parameters()) + list(m.named_buffers())


def _map(fn: Any, a: Any) -> Any:
    """``fn`` applied to every leaf of ``a`` through tuples, lists, dicts and slices (what fx
    node arguments hold): pytree's ``tree_map`` is several times slower on these."""
    t = type(a)
    if t is tuple or t is list:
        return t(_map(fn, x) for x in a)
    if t is dict:
        return {k: _map(fn, v) for k, v in a.items()}
    if t is slice:
        return slice(_map(fn, a.start), _map(fn, a.stop), _map(fn, a.step))
    return fn(a)


def _value(a: Any) -> Any:
    return a.value if isinstance(a, ConcreteProxy) else a


def _unpack(args: tuple, kwargs: dict) -> tuple[tuple, dict, int]:
    """The values of ``args`` and ``kwargs``, and the union of their proxies' flags."""
    flags = 0

    def value(a: Any) -> Any:
        nonlocal flags
        if isinstance(a, ConcreteProxy):
            flags |= a.flags
            return a.value
        return a

    return _map(value, args), _map(value, kwargs), flags


def _broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """numpy's broadcasting of ``shapes`` (``torch.broadcast_shapes`` without its checks for
    symbolic sizes, several times faster); raises ``ValueError`` where they do not broadcast."""
    out = []
    for dims in itertools.zip_longest(*(reversed(s) for s in shapes), fillvalue=1):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(reversed(out))


_FACTORIES = (
    "ones", "zeros", "empty", "full", "rand", "randn", "randint", "arange", "eye", "tensor", "as_tensor",
)  # fmt: skip
"""torch's tensor factories taking sizes or values: patched while tracing (as fx patches
``Module.__call__``), so that a size that is a proxy is recorded."""


def _has_proxy(tree: Any) -> bool:
    found = [False]

    def see(a: Any) -> None:
        found[0] = found[0] or isinstance(a, ConcreteProxy)

    _map(see, tree)
    return found[0]


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _writes(target: Any, kwargs: dict) -> bool:
    """An in-place operation: ``x.add_(y)``, ``torch.relu_(x)``, ``x[i] = v``, ``out=``."""
    name = _name(target)
    return (
        (name.endswith("_") and not name.startswith("_"))
        or target is operator.setitem
        or "out" in kwargs
    )


def _is_parameter(v: Any) -> bool:
    """A parameter, or a view of one."""
    return isinstance(v, torch.nn.Parameter) or (
        isinstance(v, torch.Tensor) and isinstance(v._base, torch.nn.Parameter)
    )


def _try(fn: Any, v: Any) -> Any:
    try:
        return fn(v)
    except Exception:
        return UNKNOWN


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False  # pragma: no cover - decisions give Python values
    try:
        return bool(a == b)
    except Exception:
        return False


def _short(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _user_line() -> str:
    """The innermost frame outside torch and graphopt, as ``file:line``."""
    frame = inspect.currentframe()
    while frame is not None:
        f = frame.f_code.co_filename
        if not os.path.abspath(f).startswith(_INTERNAL_DIRS):
            return f"{f}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"
