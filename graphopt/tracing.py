"""Tracing a user's model into a :class:`~graphopt.graph.Graph`.

The user's module is deep-copied first, so nothing graphopt does can change it (its parameters
are cloned on a background thread while the front ends read them:
:class:`~graphopt.module_copy.DeferredParameters`). Tracing uses
``torch.fx`` symbolic tracing; models it cannot take go to the concrete-value tracer
(:mod:`graphopt.concrete_trace`), then to ``torch.export`` (:mod:`graphopt.export_frontend`).

**Inputs.** ``example_inputs`` is a tensor, a tuple of tensors (positional), a dict of keyword
arguments, or ``(args, kwargs)``. Every ``forward`` parameter the caller did not give is bound
to its default as a constant (fx ``concrete_args``), so flags such as ``embed=False`` or
``return_dict=None`` take their default branch; the specialised placeholders and their guards
are then removed, and the traced module takes exactly the given tensors, positionally, in
``forward``'s order (their names are kept for the ONNX export).

**Leaves.** A submodule fx cannot trace (data-dependent control flow, an untraceable call) is
made a leaf and the trace retried, innermost failing module first (NVIDIA ModelOpt's tracer
does the same); each such leaf is reported with its reason and source line. A leaf stays
opaque: passes leave its channels locked. With ``strict=True``, or when the top-level
``forward`` itself fails, the failure is a :class:`~graphopt.errors.TraceError` naming the
module and the line of the user's source that failed, and suggesting ``leaf_modules``.

What was bound and which leaves were made is in ``graph.trace_report``.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
import operator
import os
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

from .errors import DataError, TraceError, first_line
from .graph import PROGRAM_META, TRACE_META, Graph, NodeMeta, modules_by_path
from .module_copy import DeferredParameters, copy_module

log = logging.getLogger(__name__)

LeafSpec = str | type

MAX_AUTO_LEAVES = 64
FRONTENDS = ("auto", "fx", "concrete", "export")


class _Proxy(fx.Proxy):
    """fx's proxy, except that a plain torch function called on proxies (``torch.flatten``,
    ``torch.cat``) is recorded without ``torch.overrides``' table of every overridable
    function, which fx consults to tell a ``Tensor`` method from a function: building it costs
    about 12 ms and leaves some 1,400 objects for the collector (once per process). Anything
    that is an attribute of ``torch.Tensor``, a property getter, a TorchScript method or a
    higher-order operator goes to fx's own handler, so every call is recorded as before."""

    @classmethod
    def __torch_function__(cls, orig_method, types, args=None, kwargs=None):
        if not _plain_function(orig_method):
            return super().__torch_function__(orig_method, types, args, kwargs)
        args, kwargs = args or (), kwargs or {}
        tracers: dict[Any, None] = {}

        def find_tracer(a: Any) -> None:
            if isinstance(a, fx.Proxy):
                tracers[a.tracer] = None

        torch.utils._pytree.tree_map_(find_tracer, (args, kwargs))
        if len(tracers) != 1:
            return super().__torch_function__(orig_method, types, args, kwargs)
        tracer = next(iter(tracers))
        name = tracer.graph._target_to_str(orig_method.__name__)
        return tracer.create_proxy("call_function", orig_method, args, kwargs, name=name)


_TENSOR_ATTRIBUTE_IDS: set[int] = set()


def _plain_function(f: Any) -> bool:
    """Not a method or property of ``torch.Tensor`` (fx records such calls as
    ``call_method``), a TorchScript method or a higher-order operator. The class's permanent
    attributes are known by id (no object is kept); one fetched afresh on each access (a bound
    class method) by its name."""
    if isinstance(f, (torch._C.ScriptMethod, torch._ops.HigherOrderOperator)):
        return False
    name = getattr(f, "__name__", None)
    if not isinstance(name, str) or name == "__get__":
        return False
    if not _TENSOR_ATTRIBUTE_IDS:
        for attr in dir(torch.Tensor):
            value = getattr(torch.Tensor, attr, None)
            if value is getattr(torch.Tensor, attr, None):
                _TENSOR_ATTRIBUTE_IDS.add(id(value))
    if id(f) in _TENSOR_ATTRIBUTE_IDS:
        return False
    try:
        return not bool(getattr(torch.Tensor, name, None) == f)
    except Exception:  # an exotic __eq__: let fx decide
        return False


class _Tracer(fx.Tracer):
    """An FX tracer that treats user-named modules as leaves and remembers the innermost module
    being traced when something fails."""

    def __init__(self, leaf_modules: Sequence[LeafSpec] = ()):
        # the default matters: unpickling a GraphModule re-traces it with ``tracer_cls()``
        super().__init__()
        self._leaf_globs = [s for s in leaf_modules if isinstance(s, str)]
        self._leaf_types = tuple(s for s in leaf_modules if isinstance(s, type))
        self.user_leaves: set[str] = set()
        self.failed_path: str | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if (self._leaf_types and isinstance(m, self._leaf_types)) or any(
            fnmatch.fnmatchcase(module_qualified_name, g) for g in self._leaf_globs
        ):
            self.user_leaves.add(module_qualified_name)
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                try:
                    self.failed_path = self.path_of_module(m)
                except NameError:
                    self.failed_path = type(m).__name__
            raise


_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(mod.__file__)) + os.sep
    for mod in (torch, __import__("graphopt"))
)


def _user_frame(exc: BaseException) -> str | None:
    """``file:line: code`` of the innermost traceback frame outside torch and graphopt."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not os.path.abspath(frame.filename).startswith(_INTERNAL_DIRS):
            code = (frame.line or "").strip()
            return f"{frame.filename}:{frame.lineno}: {code}"
    return None


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` from a tensor, a tuple/list, a dict, or an ``(args, kwargs)`` pair."""
    x = example_inputs
    if isinstance(x, torch.Tensor):
        return (x,), {}
    if isinstance(x, dict):
        return (), dict(x)
    if (
        isinstance(x, (list, tuple))
        and len(x) == 2
        and isinstance(x[0], (list, tuple))
        and isinstance(x[1], dict)
    ):
        return tuple(x[0]), dict(x[1])
    if isinstance(x, (list, tuple)):
        return tuple(x), {}
    raise DataError(
        "example_inputs must be a tensor, a tuple of tensors, a dict of keyword arguments or "
        f"(args, kwargs); got {type(x).__name__}"
    )


def _bind(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, Any], list[str]]:
    """Match the example inputs to ``forward``'s parameters.

    Returns the given tensor inputs as ``(name, tensor)`` in ``forward``'s order, the
    parameters to bind as constants (their defaults, or a non-tensor value the caller gave;
    ``use_cache`` not given is bound to ``False``, as a Hugging Face decoder would otherwise
    return its key/value cache), and every parameter's name in order."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        sig = None
    if sig is None or any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        if kwargs:
            raise DataError(
                f"{type(model).__name__}.forward takes *args: give example inputs "
                "positionally (a tensor or a tuple)"
            )
        _check_tensors(args, type(model).__name__)
        return [(f"input_{i}" if i else "input", t) for i, t in enumerate(args)], {}, []
    params = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    names = [p.name for p in params]
    positional = [p for p in params if p.kind != p.KEYWORD_ONLY]
    if len(args) > len(positional):
        raise DataError(
            f"{type(model).__name__}.forward takes {len(positional)} positional inputs "
            f"({', '.join(p.name for p in positional)}); got {len(args)}"
        )
    given: dict[str, Any] = {p.name: a for p, a in zip(positional, args)}
    for key, value in kwargs.items():
        if key not in names:
            raise DataError(
                f"example input {key!r} is not a parameter of {type(model).__name__}.forward; "
                f"its parameters are: {', '.join(names)}"
            )
        if key in given:
            raise DataError(f"example input {key!r} is given both positionally and by name")
        given[key] = value
    tensors: list[tuple[str, torch.Tensor]] = []
    bound: dict[str, Any] = {}
    for p in params:
        if p.name in given:
            value = given[p.name]
            if isinstance(value, torch.Tensor):
                tensors.append((p.name, value))
            elif value is None or isinstance(value, (bool, int, float, str)):
                bound[p.name] = value
            else:
                raise DataError(
                    f"example_inputs: {p.name!r} is a {type(value).__name__}; give tensors, or "
                    "plain constants (bool, int, float, str, None) to bind"
                )
        elif p.name == "use_cache" and p.default in (None, True):
            # transformers' decoders return a key/value cache object by default; a compressed
            # graph computes whole sequences and returns no cache
            bound[p.name] = False
            log.info("bound use_cache=False: the graph returns no key/value cache")
        elif p.default is not p.empty:
            bound[p.name] = p.default
        else:
            raise DataError(
                f"{type(model).__name__}.forward needs {p.name!r}, which the example inputs do "
                f"not give (they give: {', '.join(given) or 'nothing'})"
            )
    if not tensors:
        raise DataError(f"the example inputs give {type(model).__name__}.forward no tensor")
    return tensors, bound, names


def _check_tensors(values: Sequence[Any], who: str) -> None:
    for v in values:
        if not isinstance(v, torch.Tensor):
            raise DataError(f"example inputs of {who} must be tensors, got {type(v).__name__}")


def _drop_bound_placeholders(gm: fx.GraphModule, order: list[str], bound: dict[str, Any]) -> None:
    """Remove the placeholders fx keeps for ``concrete_args`` (one per ``forward`` parameter,
    in ``order``) and their guards; a use of a bound value in the computation reads the
    constant."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(order):  # pragma: no cover - fx changed how it names them
        raise TraceError(
            f"fx gave {len(placeholders)} inputs for the {len(order)} parameters of forward"
        )
    for ph, name in zip(placeholders, order):
        if name not in bound:
            continue
        value = bound[name]
        for user in list(ph.users):
            if user.op == "call_function" and user.target is operator.eq:
                for guard in list(user.users):
                    if guard.op == "call_function" and guard.target is torch._assert:
                        graph.erase_node(guard)
                if not user.users:
                    graph.erase_node(user)
            elif user.op == "call_function" and getattr(user.target, "__name__", "") == (
                "_assert_is_none"
            ):
                graph.erase_node(user)
        for user in list(ph.users):

            def const(n: fx.Node, ph: fx.Node = ph, value: Any = value) -> Any:
                return value if n is ph else n

            user.args = fx.node.map_arg(user.args, const)
            user.kwargs = fx.node.map_arg(user.kwargs, const)
        graph.erase_node(ph)
    gm.recompile()


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[LeafSpec] = (),
    *,
    strict: bool = False,
    frontend: str = "auto",
) -> Graph:
    """Trace ``model`` into a :class:`Graph` without touching ``model``.

    Args:
        model: the user's module; it is deep-copied and the copy is traced.
        example_inputs: a tensor, a tuple of tensors, a dict of keyword arguments, or
            ``(args, kwargs)``; used for shape propagation and as the fixed batch the pass
            manager verifies against. Parameters not given are bound to their defaults.
        leaf_modules: module paths (fnmatch globs) or module classes to keep opaque. Passes
            leave the channels of leaf modules locked.
        strict: refuse instead of making untraceable submodules leaves automatically.
        frontend: ``fx``, ``concrete`` (:mod:`graphopt.concrete_trace`: fx with values, for
            code that decides on shapes), ``export`` (:mod:`graphopt.export_frontend`), or
            ``auto``: fx without leaves, else concrete, else export, else fx with automatic
            leaves (the report says which one served, and why the others did not).

    Raises:
        TraceError: the model cannot be traced; the message names the module and source line.
        DataError: the example inputs do not fit the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"trace() expects a torch.nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}; use one of {', '.join(FRONTENDS)}")
    args, kwargs = _split_inputs(example_inputs)
    tensors, bound, order = _bind(model, args, kwargs)
    deferred = DeferredParameters()  # cloned beside the copy and the trace, which only read
    deferred.start(model)
    try:
        root = copy_module(model, deferred=deferred)
    except Exception as e:  # pragma: no cover - exotic modules
        deferred.wait()
        raise TraceError(f"cannot deep-copy the model ({type(e).__name__}: {e})") from e
    try:
        cap = _capture(model, root, deferred, tensors, bound, order, list(leaf_modules),
                       strict, frontend)  # fmt: skip
    finally:
        deferred.wait()
    gm, user_leaves, served, out_names, auto, failures, concrete = cap
    _annotate(gm, user_leaves)
    gm.meta[TRACE_META] = {
        "frontend": served,
        "inputs": [name for name, _ in tensors],
        "named_inputs": bool(kwargs),
        "outputs": out_names or _dict_output_names(gm),
        "fallbacks": failures,
        "bound": {k: repr(v) for k, v in bound.items()},
        "auto_leaves": auto,
    }
    if concrete is not None:
        gm.meta[TRACE_META]["specialized"] = concrete.specialized
    graph = Graph(gm, tuple(t for _, t in tensors))
    if concrete is None:
        graph.propagate_shapes()
    else:
        from .concrete_trace import INFO

        if concrete.outputs is not None:  # it computed every value
            graph.adopt_trace_values(INFO, concrete.outputs)
        else:  # retried at another batch: its values are not the example's
            for node in gm.graph.nodes:
                node.meta.pop(INFO, None)
            graph.propagate_shapes()
    log.debug("traced %s: %d nodes", type(model).__name__, len(gm.graph.nodes))
    return graph


def _capture(
    model: torch.nn.Module,
    root: torch.nn.Module,
    deferred: DeferredParameters,
    tensors: list[tuple[str, torch.Tensor]],
    bound: dict[str, Any],
    order: list[str],
    leaves: list[LeafSpec],
    strict: bool,
    frontend: str,
) -> tuple[fx.GraphModule, set[str], str, list[str], list[dict[str, str]], list[str], Any]:
    """The front ends in turn, as :func:`trace` describes; the graph's parameters get their own
    storage (``deferred``) once one of them has captured ``root``."""
    copied = root
    failures: list[str] = []
    fx_error: TraceError | None = None
    gm = user_leaves = None
    served = frontend
    out_names: list[str] = []
    auto: list[dict[str, str]] = []
    if frontend in ("fx", "auto"):
        try:
            gm, user_leaves, auto = _trace_fx(
                model, root, leaves, bound, order, strict=strict or frontend == "auto"
            )
            served = "fx"
        except TraceError as e:
            if frontend == "fx":
                raise
            fx_error = e
            failures.append(f"fx: {e}")
    concrete = None
    if gm is None and frontend in ("concrete", "auto"):
        try:
            gm, concrete = _trace_concrete(model, root, tensors, bound, leaves)
            user_leaves, served = concrete.user_leaves, "concrete"
            out_names = output_names(concrete.out_spec)
        except TraceError as e:
            if frontend == "concrete":
                raise
            failures.append(f"concrete: {e}")
            deferred.wait()
            root = copy_module(model)  # the failed trace may have left proxies in the copy
    if gm is None and frontend in ("export", "auto") and not leaves:
        from .export_frontend import export_graph_module

        try:
            gm, out_names = export_graph_module(root, tensors, bound)
            user_leaves, served = set(), "export"
        except TraceError as e:
            if frontend == "export":
                raise
            failures.append(f"export: {e}")
    elif gm is None and frontend == "export":
        raise TraceError("frontend=export does not take leaf_modules; use frontend=fx")
    if gm is None and frontend == "auto" and not strict:
        try:
            gm, user_leaves, auto = _trace_fx(model, root, leaves, bound, order, strict=False)
            served = "fx"
        except TraceError as e:
            failures.append(f"fx with automatic leaves: {e}")
    if gm is None:
        if len(failures) == 1 and fx_error is not None:
            raise fx_error
        raise TraceError(
            "neither front end can capture the model: "
            + " | ".join(failures)
            + "; try leaf_modules=[...] for the failing submodule (CLI: --leaf PATH)",
            module_path=fx_error.module_path if fx_error else None,
            source=fx_error.source if fx_error else None,
        )
    if root is copied and (concrete is None or concrete.root is root):  # else a fresh copy
        try:
            deferred.finish(root)
        except RuntimeError as e:
            raise TraceError(str(e)) from e
    return gm, user_leaves, served, out_names, auto, failures, concrete


def _trace_concrete(
    model: torch.nn.Module,
    root: torch.nn.Module,
    tensors: list[tuple[str, torch.Tensor]],
    bound: dict[str, Any],
    leaves: list[LeafSpec],
) -> tuple[fx.GraphModule, Any]:
    """:mod:`graphopt.concrete_trace`; where a decision depends on the batch and the example's
    batch is 1, the trace is retried at a batch of 2, as ``torch.export`` is (a size of 1
    broadcasts, and code tests for it). The retried trace's values are not the example's, so
    its ``outputs`` are ``None``."""
    from .concrete_trace import BatchSpecialized, concrete_graph_module

    name = type(model).__name__
    try:
        try:
            return concrete_graph_module(root, tensors, bound, leaves, class_name=name)
        except BatchSpecialized as e:
            ones = all(t.dim() == 0 or t.shape[0] == 1 for _, t in tensors)
            if not ones:
                raise
            log.info("concrete trace: %s; retrying at a batch of 2", e)
            twice = [(n, torch.cat([t, t]) if t.dim() else t) for n, t in tensors]
            gm, tracer = concrete_graph_module(copy_module(model), twice, bound, leaves, name)
            tracer.outputs = None
            return gm, tracer
    except TraceError:
        raise
    except Exception as e:
        raise _trace_error(model, e, getattr(e, "failed_path", None)) from e


def _trace_fx(
    model: torch.nn.Module,
    root: torch.nn.Module,
    leaves: list[LeafSpec],
    bound: dict[str, Any],
    order: list[str],
    strict: bool,
) -> tuple[fx.GraphModule, set[str], list[dict[str, str]]]:
    """fx symbolic tracing, making failing submodules leaves unless ``strict``."""
    leaves = list(leaves)
    auto: list[dict[str, str]] = []
    while True:
        tracer = _Tracer(leaves)
        if isinstance(root, fx.GraphModule) and root.meta.get(PROGRAM_META) and not bound:
            fx_graph = copy.deepcopy(root.graph)  # a loaded program is its graph already:
            break  # re-tracing it would fold its int8 weights into float constants
        try:
            fx_graph = tracer.trace(root, concrete_args=dict(bound) or None)
            break
        except Exception as e:
            path = tracer.failed_path
            error = _trace_error(model, e, path)
            if strict or not path or path in leaves or len(auto) >= MAX_AUTO_LEAVES:
                raise error from e
            reason = first_line(e)
            auto.append({"module": path, "reason": reason, "source": error.source or ""})
            log.info("trace: %s made a leaf (%s)", path, reason)
            leaves.append(path)
    gm = fx.GraphModule(root, fx_graph, class_name=type(model).__name__)
    if bound:
        _drop_bound_placeholders(gm, order, bound)
    return gm, tracer.user_leaves, auto


def output_names(spec: Any) -> list[str]:
    """``last_hidden_state``-style names of a dict/ModelOutput output (the keys its pytree
    spec keeps, ``None`` fields left out), else empty."""
    keys = getattr(spec, "context", None)
    if isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys):
        return list(keys)
    return []


def _dict_output_names(gm: fx.GraphModule) -> list[str]:
    """The keys of a dict the traced forward returns (``[]`` otherwise)."""
    for node in gm.graph.nodes:
        if node.op == "output" and isinstance(node.args[0], dict):
            return [str(k) for k, v in node.args[0].items() if isinstance(v, fx.Node)]
    return []


def _trace_error(model: torch.nn.Module, e: BaseException, path: str | None) -> TraceError:
    where = f"module {path!r}" if path else f"the top-level {type(model).__name__}.forward"
    src = _user_frame(e)
    first = first_line(e)
    hint = (
        f"pass leaf_modules=[{path!r}] (CLI: --leaf {path}) to keep it opaque"
        if path
        else "make forward traceable or mark the failing submodule with leaf_modules"
    )
    msg = f"cannot trace {where}: {first}"
    if src:
        msg += f" at {src}"
    return TraceError(f"{msg}; {hint}", module_path=path, source=src)


def _annotate(gm: fx.GraphModule, user_leaves: set[str]) -> None:
    """Fill each node's :class:`NodeMeta` with its module path, type and provenance."""
    modules = modules_by_path(gm)
    for node in gm.graph.nodes:
        meta = NodeMeta()
        if node.op == "call_module":
            meta.module_path = str(node.target)
            meta.module_type = type(modules[node.target]).__name__
            meta.provenance = [meta.module_path]
            meta.leaf = meta.module_path in user_leaves
        else:
            stack = node.meta.get("nn_module_stack")
            if stack:
                path, cls = list(stack.values())[-1]
                meta.module_path = str(path)
                meta.module_type = getattr(cls, "__name__", str(cls))
            if node.op == "get_attr":
                meta.module_path = (
                    str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else ""
                )
        node.meta["graphopt"] = meta
