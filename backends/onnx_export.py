"""ONNX export of a :class:`~graphopt.graph.Graph` (the ONNX Runtime backend's first half).

``export`` lowers ``graph.module`` with the torch.export-based exporter (``dynamo=True``),
with a dynamic batch dimension, and writes the file atomically. Inputs and outputs are named
after the traced model's when it was traced with keyword inputs or returns a dict
(``input_ids``, ``logits``), else ``input``/``output`` (``input_0``, ... for several). Every
ONNX node carries ``metadata_props``:

- ``graphopt.module_path``: the module path of the graphopt node it came from (the target of a
  ``call_module`` node; for ``call_function`` nodes such as residual adds, the module whose
  ``forward`` made the call, e.g. ``layer1.0``; ``""`` for the top-level module);
- ``graphopt.node``: the name of that torch.fx node in ``graph.module``;
- ``graphopt.provenance``: the original module paths merged into it (comma separated).

The exporter's own Python stack trace and class hierarchy per node are dropped: they hold
absolute file paths of the exporting machine and took about 1 kB a node.

The mapping follows the exporter's own provenance: each ONNX node names the torch.export node
it was translated from (``pkg.torch.onnx.fx_node``), whose ``from_node`` chain leads back to
the graphopt node. The exporter's optimiser folds an eval-mode BatchNorm into the Conv/Gemm
before it and keeps the BatchNorm's metadata on the fused node; graphopt gives that node the
Conv's path and records both modules in ``graphopt.provenance``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.atomic import atomic_path
from graphopt.capture import output_to_log
from graphopt.errors import BackendError
from graphopt.graph import PIPELINE_META, Graph, node_meta

log = logging.getLogger(__name__)

MODULE_PATH_KEY = "graphopt.module_path"
NODE_KEY = "graphopt.node"
PROVENANCE_KEY = "graphopt.provenance"
PIPELINE_KEY = PIPELINE_META

_FX_NODE_KEY = "pkg.torch.onnx.fx_node"
_DROPPED_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy")
"""The exporter's per-node Python stack trace and class hierarchy: file paths of the machine
that exported the model, more bytes than many int8 weights; the module path stays."""
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_RULE_KEY = "pkg.onnxscript.rewriter.rule_name"
_FX_NODE_NAME = re.compile(r"^%(\S+) :")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A protobuf message cannot exceed 2 GiB; above this, weights go to "<name>.data" beside it.
_SINGLE_FILE_LIMIT = 2**31 - 2**27


# -- export -------------------------------------------------------------------------------------
def export(
    graph: Graph,
    path: str | os.PathLike,
    opset: int = 18,
    dynamic_batch: bool = True,
    pipeline: str | None = None,
    allow_torchscript: bool = False,
) -> Path:
    """Export ``graph.module`` to the ONNX file ``path`` (written atomically) and return it.

    The inputs are named ``input`` (``input_0``, ``input_1``, ... for several), the outputs
    ``output`` (``output_0``, ...). With ``dynamic_batch`` dimension 0 of every input is
    symbolic (``batch``); if the exporter cannot keep it dynamic the model is exported with
    the example batch size and a warning is logged. ``pipeline`` (default: the graph's
    ``graph.module.meta["graphopt.pipeline"]``) is stored in the model's metadata.

    If the torch.export-based exporter fails, the TorchScript exporter is tried. It runs the
    model once and records what that run did, so Python control flow inside a leaf module is
    frozen on the example input: a graph with leaf modules falls back only with
    ``allow_torchscript=True`` (CLI ``--allow-torchscript``); a graph without leaves holds no
    Python branches (fx traced all of it), so it falls back freely.

    Raises:
        BackendError: the exporter failed; the message names the failing node or op.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"export() expects a graphopt.Graph, got {type(graph).__name__}")
    target = Path(path)
    inputs = graph.example_inputs
    traced = graph.trace_report
    in_names = _names("input", len(inputs))
    if traced.get("named_inputs") and len(traced.get("inputs", ())) == len(inputs):
        in_names = list(traced["inputs"])
    n_out = _count_outputs(graph.module)
    out_names = _names("output", n_out)
    if len(traced.get("outputs") or ()) == n_out:
        out_names = list(traced["outputs"])
    if pipeline is None:
        pipeline = graph.module.meta.get(PIPELINE_KEY)
    if graph.module.training:
        log.warning("exporting %s in training mode; call .eval() first for inference", target)

    t0 = time.perf_counter()
    attempts = [True, False] if dynamic_batch and any(t.dim() for t in inputs) else [False]
    error: BaseException | None = None
    program = None
    for dynamic in attempts:
        try:
            program = _export_dynamo(graph, opset, dynamic, in_names, out_names)
            break
        except Exception as e:
            error = e
            if dynamic and _shape_related(e):
                log.warning(
                    "dynamic-batch export failed (%s); retrying with static input shapes",
                    _first_line(_root(e)),
                )
                continue
            break

    if program is not None:
        dynamic = _finish_axes(program, dynamic_batch)
        annotated = _annotate_nodes(program, graph)
        model = program.model
        _set_model_metadata(model.metadata_props, pipeline, dynamic, "torch.onnx (dynamo)")
        try:
            _save_ir(model, target)
        except OSError as e:
            raise BackendError(f"cannot write {target}: {_first_line(e)}") from e
        log.info(
            "exported %s: %d nodes (%d with module paths), %s batch, %.1fs",
            target,
            model.graph.num_nodes(),
            annotated,
            "dynamic" if dynamic else "static",
            time.perf_counter() - t0,
        )
        return target

    assert error is not None
    leaves = _leaf_modules(graph)
    if leaves and not allow_torchscript:
        raise BackendError(
            f"{_export_message(graph, error)}. The TorchScript exporter could still write a file, "
            "but it records one run of the leaf module(s) "
            f"{', '.join(leaves[:3])}{' ...' if len(leaves) > 3 else ''}, freezing any branch on "
            "tensor values there, so the file may be silently wrong for other inputs; pass "
            "allow_torchscript=True (CLI --allow-torchscript) to accept that (parity is then "
            "checked on several inputs), or make the leaf traceable"
        ) from error
    log.warning(
        "torch.onnx dynamo export failed (%s); falling back to the TorchScript exporter: its "
        "nodes carry no module paths and it freezes data-dependent branches (check parity)",
        _first_line(_root(error)),
    )
    try:
        proto = _export_torchscript(graph, opset, dynamic_batch, in_names, out_names)
    except Exception as e:
        log.debug("TorchScript exporter failed too: %s", _first_line(_root(e)))
        raise BackendError(_export_message(graph, error)) from error
    dims = proto.graph.input[0].type.tensor_type.shape.dim if proto.graph.input else []
    dynamic = bool(dims) and bool(dims[0].dim_param)
    props = {p.key: p.value for p in proto.metadata_props}
    _set_model_metadata(props, pipeline, dynamic, "torch.onnx (torchscript)")
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    try:
        _save_proto(proto, target)
    except OSError as e:
        raise BackendError(f"cannot write {target}: {_first_line(e)}") from e
    log.info("exported %s with the TorchScript exporter (%.1fs)", target, time.perf_counter() - t0)
    return target


def _leaf_modules(graph: Graph) -> list[str]:
    """Module paths of the leaf modules (user's or automatic) the graph calls."""
    return [
        str(n.target)
        for n in graph.module.graph.nodes
        if n.op == "call_module" and getattr(n.meta.get("graphopt"), "leaf", False)
    ]


def _names(stem: str, n: int) -> list[str]:
    return [stem] if n == 1 else [f"{stem}_{i}" for i in range(n)]


def _count_outputs(gm: fx.GraphModule) -> int:
    for node in gm.graph.nodes:
        if node.op == "output":
            leaves = pytree.tree_leaves(node.args[0])
            return sum(1 for x in leaves if isinstance(x, fx.Node)) or 1
    return 1


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings (training mode, deprecations, ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export_dynamo(graph: Graph, opset: int, dynamic: bool, in_names, out_names):
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        dynamic_shapes = tuple({0: dim} if t.dim() else {} for t in graph.example_inputs)
    with _quiet(), output_to_log():
        program = torch.onnx.export(
            graph.module,
            graph.example_inputs,
            dynamo=True,
            opset_version=opset,
            input_names=in_names,
            output_names=out_names,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=_custom_translations() or None,
            optimize=True,
            verbose=False,
        )
    if program is None:  # pragma: no cover - only when f= is given
        raise BackendError("torch.onnx.export returned no program")
    return program


# graphopt modules that define their own torch ops, with ONNX translations for them: a graph
# can only hold such an op once its module is imported, so loaded ones are all that matter.
_OP_MODULES = ("graphopt.quant.dynamic",)


def _custom_translations() -> dict:
    table: dict = {}
    for name in _OP_MODULES:
        mod = sys.modules.get(name)
        if mod is not None:
            table.update(getattr(mod, "ONNX_TRANSLATIONS", {}))
    return table


def _export_torchscript(graph: Graph, opset: int, dynamic: bool, in_names, out_names):
    import onnx

    axes = None
    if dynamic:
        axes = {n: {0: "batch"} for n, t in zip(in_names, graph.example_inputs) if t.dim()}
        axes.update({n: {0: "batch"} for n in out_names})
    buf = io.BytesIO()
    with _quiet(), output_to_log():
        torch.onnx.export(
            graph.module,
            graph.example_inputs,
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=axes,
            verbose=False,
        )
    return onnx.load_from_string(buf.getvalue())


def _finish_axes(program, wanted: bool) -> bool:
    """Name the symbolic batch dimension ``batch`` and report whether it stayed dynamic."""
    import onnx_ir as ir

    dims = []
    for value in program.model.graph.inputs:
        if value.shape is not None and len(value.shape) > 0:
            dims.append(value.shape[0])
    symbolic = [d for d in dims if isinstance(d, ir.SymbolicDim) and d.value]
    if symbolic:
        names = {}
        for d in symbolic:
            names.setdefault(d.value, "batch" if not names else f"batch_{len(names)}")
        program.rename_axes(names)
    dynamic = bool(dims) and len(symbolic) == len(dims)
    if wanted and dims and not dynamic:
        log.warning(
            "the batch dimension was fixed by the model (torch.export specialised it); "
            "the ONNX model only accepts batch %s",
            dims[0],
        )
    return dynamic


def _set_model_metadata(props, pipeline: str | None, dynamic: bool, exporter: str) -> None:
    from graphopt import __version__

    props["graphopt.version"] = __version__
    props["graphopt.exporter"] = exporter
    props["graphopt.dynamic_batch"] = "true" if dynamic else "false"
    if pipeline:
        props[PIPELINE_KEY] = str(pipeline)


# -- node metadata ------------------------------------------------------------------------------
def _annotate_nodes(program, graph: Graph) -> int:
    """Write graphopt's module path, node and provenance into each ONNX node; returns how many
    nodes were traced back to a graphopt node."""
    ours = {n.name: n for n in graph.module.graph.nodes}
    gid = id(graph.module.graph)
    ep = getattr(program, "exported_program", None)
    ep_nodes = {n.name: n for n in ep.graph.nodes} if ep is not None else {}
    found = 0
    for onode in program.model.graph.all_nodes():
        props = onode.metadata_props
        for key in _DROPPED_KEYS:  # absolute paths of this machine, ~1 kB a node
            props.pop(key, None)
        src = None
        m = _FX_NODE_NAME.match(props.get(_FX_NODE_KEY, ""))
        if m and m.group(1) in ep_nodes:
            src = _origin(ep_nodes[m.group(1)], ours, gid)
        if src is None:
            props[MODULE_PATH_KEY] = _scope_path(props.get(_SCOPES_KEY, ""))
            continue
        found += 1
        primary, provenance = src, list(node_meta(src).provenance)
        if "FuseBatchNormInto" in props.get(_RULE_KEY, ""):
            # the fused Conv/Gemm carries the BatchNorm's metadata; name it after the conv
            feeder = next((a for a in src.args if isinstance(a, fx.Node)), None)
            if feeder is not None and feeder.op != "placeholder":
                primary = feeder
                provenance = _unique(node_meta(feeder).provenance + provenance)
        meta = node_meta(primary)
        props[MODULE_PATH_KEY] = meta.module_path or ""
        props[NODE_KEY] = primary.name
        if provenance:
            props[PROVENANCE_KEY] = ",".join(provenance)
    return found


def _origin(ep_node: fx.Node, ours: dict[str, fx.Node], gid: int) -> fx.Node | None:
    """The graphopt node an exported-program node came from (via ``meta["from_node"]``)."""
    fallback = None
    stack = list(ep_node.meta.get("from_node") or [])
    while stack:
        src = stack.pop()
        name = getattr(src, "name", None)
        if name in ours:
            if getattr(src, "graph_id", None) == gid:
                return ours[name]
            if fallback is None and "Interpreter" in str(getattr(src, "pass_name", "")):
                fallback = ours[name]
        stack.extend(getattr(src, "from_node", None) or [])
    return fallback


def _scope_path(text: str) -> str:
    """The innermost module path in the exporter's ``name_scopes`` list (``""`` if none)."""
    try:
        scopes = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return ""
    mods = [s for s in scopes[:-1] if isinstance(s, str) and not s.startswith("_empty_nn")]
    return mods[-1] if mods else ""


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


# -- writing ------------------------------------------------------------------------------------
def _save_ir(model, target: Path) -> None:
    import onnx_ir as ir

    size = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
    if size < _SINGLE_FILE_LIMIT:
        with atomic_path(target) as tmp:
            ir.save(model, tmp, format="protobuf")
        return
    # Too big for one protobuf: write "<name>" + "<name>.data" in a temporary directory beside
    # the target, then move the data file and the model into place.
    data_name = f"{target.name}.data"
    log.info("model weights are %.2f GB; writing them to %s", size / 1e9, data_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as d:
        ir.save(model, Path(d) / target.name, format="protobuf", external_data=data_name)
        os.replace(Path(d) / data_name, target.parent / data_name)
        os.replace(Path(d) / target.name, target)


def _save_proto(proto, target: Path) -> None:
    import onnx

    with atomic_path(target) as tmp:
        onnx.save_model(proto, str(tmp))


# -- errors -------------------------------------------------------------------------------------
def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _root(e: BaseException) -> BaseException:
    return _chain(e)[-1]


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _shape_related(e: BaseException) -> bool:
    """Whether an export error is about the dynamic batch dimension (worth a static retry)."""
    markers = ("Constraints violated", "dynamic_shapes", "specializ", "Dim(")
    for c in _chain(e):
        if "ConstraintViolation" in type(c).__name__ or any(m in str(c) for m in markers):
            return True
    return False


def _export_message(graph: Graph, e: BaseException) -> str:
    """One line: where the export failed, why, and what to do."""
    text = "\n".join(_ANSI.sub("", str(c)) for c in _chain(e))
    root = _root(e)
    where, op = "", None
    m = re.search(r"While executing %(\w+)", text)
    if m:
        name = m.group(1)
        node = next((n for n in graph.module.graph.nodes if n.name == name), None)
        path = node_meta(node).module_path if node is not None else None
        where = f" at node {name!r}" + (f" (module {path!r})" if path else "")
    m = re.search(r"Error when translating node %(\w+) .*?target=([\w.:]+)", text)
    if m:
        where = where or f" at exported node {m.group(1)!r}"
        op = m.group(2)
    m = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if m:
        op = m.group(1)
    if op:
        where += f" (op {op})"
        hint = (
            "torch.onnx has no ONNX translation for this op: replace it in the model with "
            "exportable ops (or register a translation via torch.onnx custom_translation_table)"
        )
    elif type(e).__name__ == "TorchExportError":
        hint = "torch.export could not trace the graph: make that forward exportable"
    else:
        hint = "run torch.onnx.export(graph.module, graph.example_inputs) to see the full error"
    reason = _first_line(root).replace("\n", " ")
    return f"ONNX export of {type(graph.module).__name__} failed{where}: {reason}; {hint}"


# -- running ------------------------------------------------------------------------------------
