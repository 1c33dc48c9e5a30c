"""Tracing a user's model into a :class:`~graphopt.graph.Graph`.

The user's module is deep-copied first, so nothing graphopt does can change it. Tracing uses
``torch.fx`` symbolic tracing; a failure (data-dependent control flow, an untraceable call)
becomes a :class:`~graphopt.errors.TraceError` naming the module being traced and the line of
the user's source that failed, and suggesting ``leaf_modules``.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import os
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

from .errors import DataError, TraceError
from .graph import Graph, NodeMeta

log = logging.getLogger(__name__)

LeafSpec = str | type


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


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)) and all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        return tuple(example_inputs)
    raise DataError(
        "example_inputs must be a tensor or a tuple of tensors, "
        f"got {type(example_inputs).__name__}"
    )


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[LeafSpec] = (),
) -> Graph:
    """Trace ``model`` into a :class:`Graph` without touching ``model``.

    Args:
        model: the user's module; it is deep-copied and the copy is traced.
        example_inputs: a tensor or tuple of tensors; used for shape propagation and as the
            fixed batch the pass manager verifies against.
        leaf_modules: module paths (fnmatch globs) or module classes to keep opaque. Passes
            leave the channels of leaf modules locked.

    Raises:
        TraceError: the model cannot be traced; the message names the module and source line.
        DataError: the example inputs do not fit the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"trace() expects a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    try:
        root = copy.deepcopy(model)
    except Exception as e:  # pragma: no cover - exotic modules
        raise TraceError(f"cannot deep-copy the model ({type(e).__name__}: {e})") from e

    tracer = _Tracer(list(leaf_modules))
    try:
        fx_graph = tracer.trace(root)
    except Exception as e:
        path = tracer.failed_path
        where = f"module {path!r}" if path else f"the top-level {type(model).__name__}.forward"
        src = _user_frame(e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (
            f"pass leaf_modules=[{path!r}] (CLI: --leaf {path}) to keep it opaque"
            if path
            else "make forward traceable or mark the failing submodule with leaf_modules"
        )
        msg = f"cannot trace {where}: {first}"
        if src:
            msg += f" at {src}"
        raise TraceError(f"{msg}; {hint}", module_path=path, source=src) from e

    gm = fx.GraphModule(root, fx_graph, class_name=type(model).__name__)
    _annotate(gm, tracer.user_leaves)
    graph = Graph(gm, inputs)
    graph.propagate_shapes()
    log.debug("traced %s: %d nodes", type(model).__name__, len(gm.graph.nodes))
    return graph


def _annotate(gm: fx.GraphModule, user_leaves: set[str]) -> None:
    """Fill each node's :class:`NodeMeta` with its module path, type and provenance."""
    for node in gm.graph.nodes:
        meta = NodeMeta()
        if node.op == "call_module":
            meta.module_path = str(node.target)
            meta.module_type = type(gm.get_submodule(node.target)).__name__
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
