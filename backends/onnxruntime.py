"""ONNX Runtime backend: export a :class:`~graphopt.graph.Graph` to ONNX, run it, check it.

``export`` lowers ``graph.module`` with the torch.export-based exporter (``dynamo=True``),
with a dynamic batch dimension, and writes the file atomically. Every ONNX node carries
``metadata_props``:

- ``graphopt.module_path``: the module path of the graphopt node it came from (the target of a
  ``call_module`` node; for ``call_function`` nodes such as residual adds, the module whose
  ``forward`` made the call, e.g. ``layer1.0``; ``""`` for the top-level module);
- ``graphopt.node``: the name of that torch.fx node in ``graph.module``;
- ``graphopt.provenance``: the original module paths merged into it (comma separated).

The mapping follows the exporter's own provenance: each ONNX node names the torch.export node
it was translated from (``pkg.torch.onnx.fx_node``), whose ``from_node`` chain leads back to
the graphopt node. The exporter's optimiser folds an eval-mode BatchNorm into the Conv/Gemm
before it and keeps the BatchNorm's metadata on the fused node; graphopt gives that node the
Conv's path and records both modules in ``graphopt.provenance``.

``session``/``run`` wrap ONNX Runtime on the CPU, ``check_parity`` compares torch against ORT
with :mod:`graphopt.metrics`, and ``benchmark``/``torch_benchmark`` time repeated runs.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.atomic import atomic_path
from graphopt.errors import BackendError
from graphopt.graph import PIPELINE_META, Graph, node_meta
from graphopt.metrics import drift, within

log = logging.getLogger(__name__)

MODULE_PATH_KEY = "graphopt.module_path"
NODE_KEY = "graphopt.node"
PROVENANCE_KEY = "graphopt.provenance"
PIPELINE_KEY = PIPELINE_META

_FX_NODE_KEY = "pkg.torch.onnx.fx_node"
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
) -> Path:
    """Export ``graph.module`` to the ONNX file ``path`` (written atomically) and return it.

    The inputs are named ``input`` (``input_0``, ``input_1``, ... for several), the outputs
    ``output`` (``output_0``, ...). With ``dynamic_batch`` dimension 0 of every input is
    symbolic (``batch``); if the exporter cannot keep it dynamic the model is exported with
    the example batch size and a warning is logged. ``pipeline`` (default: the graph's
    ``graph.module.meta["graphopt.pipeline"]``) is stored in the model's metadata.

    Raises:
        BackendError: the exporter failed; the message names the failing node or op.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"export() expects a graphopt.Graph, got {type(graph).__name__}")
    target = Path(path)
    inputs = graph.example_inputs
    in_names = _names("input", len(inputs))
    out_names = _names("output", _count_outputs(graph.module))
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


@contextlib.contextmanager
def _output_to_log() -> Iterator[None]:
    """Capture file descriptors 1 and 2 into the debug log. The exporters write there directly:
    torch.export's shape warnings and graph dumps on stderr, and, when the TorchScript exporter
    fails, its C++ side prints the whole TorchScript IR on stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = [(fd, os.dup(fd)) for fd in (1, 2)]
        for fd, _ in saved:
            os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("exporter output:\n%s", text)


def _export_dynamo(graph: Graph, opset: int, dynamic: bool, in_names, out_names):
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        dynamic_shapes = tuple({0: dim} if t.dim() else {} for t in graph.example_inputs)
    with _quiet(), _output_to_log():
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
    with _quiet(), _output_to_log():
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
def session(
    path: str | os.PathLike,
    threads: int = 1,
    optimized_model_path: str | os.PathLike | None = None,
    reference: bool = False,
) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` for ``path``: ``threads`` intra-op threads, one inter-op
    thread, sequential execution. ``optimized_model_path`` saves ORT's optimised graph there
    (atomically).

    ``reference=True`` turns ORT's graph optimisations off, so a QDQ model runs as the ONNX
    operator definitions say (DequantizeLinear -> float op -> QuantizeLinear) and not through
    fused integer kernels: the same result on every CPU, which fused ``u8 x s8`` kernels on x86
    without VNNI do not give (see :mod:`graphopt.cpu`)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    p = Path(path)
    if not p.is_file():
        raise BackendError(f"no ONNX file at {p}; export one with graphopt.backends.onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if reference:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if optimized_model_path is None:
            return ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        if Path(optimized_model_path).suffix == ".ort":
            opts.add_session_config_entry("session.save_model_format", "ORT")
        with atomic_path(optimized_model_path) as tmp:
            opts.optimized_model_filepath = str(tmp)
            return ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BackendError(f"ONNX Runtime cannot load {p}: {_first_line(e)}") from e


_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _feed(sess: ort.InferenceSession, arrays: Sequence[Any]) -> dict[str, np.ndarray]:
    specs = sess.get_inputs()
    if len(arrays) != len(specs):
        want = ", ".join(f"{s.name}{list(s.shape)}" for s in specs)
        raise BackendError(
            f"the ONNX model takes {len(specs)} input(s) ({want}), got {len(arrays)}"
        )
    feed = {}
    for spec, x in zip(specs, arrays):
        a = _as_numpy(x)
        dtype = _ORT_TO_NUMPY.get(spec.type)
        if dtype is not None and a.dtype != dtype:
            a = a.astype(dtype)
        feed[spec.name] = np.ascontiguousarray(a)
    return feed


def run(sess_or_path: ort.InferenceSession | str | os.PathLike, *arrays: Any) -> list[np.ndarray]:
    """Run the model on ``arrays`` (numpy arrays or tensors, in input order); list of outputs."""
    sess = sess_or_path if isinstance(sess_or_path, ort.InferenceSession) else session(sess_or_path)
    feed = _feed(sess, arrays)
    try:
        return list(sess.run(None, feed))
    except Exception as e:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())
        raise BackendError(f"ONNX Runtime failed on inputs {shapes}: {_first_line(e)}") from e


def _as_inputs(inputs: Any) -> tuple[Any, ...]:
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        return (inputs,)
    return tuple(inputs)


def check_parity(
    graph: Graph,
    path: str | os.PathLike,
    inputs: Any = None,
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> dict[str, Any]:
    """Compare ``graph.module`` (torch) against the ONNX file at ``path`` (ORT) on ``inputs``
    (default: the graph's example inputs).

    Returns ``max_abs``, ``rel``, ``cosine``, ``top1`` (2-D first output only) and ``ok``:
    ``max|ort - torch| <= atol + rtol * max|torch|`` for every output.
    """
    xs = tuple(
        torch.as_tensor(x) for x in _as_inputs(graph.example_inputs if inputs is None else inputs)
    )
    with torch.no_grad():
        expected = [
            t.detach() for t in pytree.tree_leaves(graph.module(*xs)) if isinstance(t, torch.Tensor)
        ]
    got = [torch.from_numpy(np.asarray(a)) for a in run(path, *xs)]
    result: dict[str, Any] = {"outputs": len(got)}
    shapes_ok = len(got) == len(expected) and all(
        tuple(a.shape) == tuple(b.shape) for a, b in zip(got, expected)
    )
    if not shapes_ok:
        result.update(
            max_abs=float("inf"),
            rel=float("inf"),
            cosine=float("nan"),
            ok=False,
            error=(
                f"ORT outputs {[list(a.shape) for a in got]} vs torch "
                f"{[list(b.shape) for b in expected]}"
            ),
        )
        return result
    result.update(drift(got, expected))
    result["ok"] = bool(within(got, expected, rtol=rtol, atol=atol))
    return result


# -- timing -------------------------------------------------------------------------------------
def _stats(times_s: list[float], threads: int) -> dict[str, Any]:
    ms = np.asarray(times_s) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "mean_ms": float(ms.mean()),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "stdev_ms": float(statistics.stdev(ms)) if len(ms) > 1 else 0.0,
        "runs": len(ms),
        "threads": threads,
    }


def _timed(fn, warmup: int, runs: int, min_seconds: float) -> list[float]:
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(max(0, warmup)):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _dummy_inputs(sess: ort.InferenceSession) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for spec in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        dtype = _ORT_TO_NUMPY.get(spec.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            out.append(rng.standard_normal(shape).astype(dtype))
        else:
            out.append(np.zeros(shape, dtype=dtype))
    return out


def benchmark(
    path: str | os.PathLike,
    threads: int = 1,
    inputs: Any = None,
    warmup: int = 5,
    runs: int = 30,
    min_seconds: float = 0.0,
) -> dict[str, Any]:
    """Latency of the ONNX model at ``path`` in ORT: ``warmup`` untimed runs, then at least
    ``runs`` timed runs (and at least ``min_seconds``). Without ``inputs``, random inputs of
    the model's input shapes (dynamic dimensions set to 1)."""
    sess = session(path, threads=threads)
    arrays = _dummy_inputs(sess) if inputs is None else list(_as_inputs(inputs))
    feed = _feed(sess, arrays)
    times = _timed(lambda: sess.run(None, feed), warmup, runs, min_seconds)
    result = _stats(times, threads)
    result["batch"] = int(next(iter(feed.values())).shape[0]) if feed else 0
    return result


def torch_benchmark(
    module: torch.nn.Module | Graph,
    inputs: Any,
    threads: int = 1,
    warmup: int = 3,
    runs: int = 20,
    min_seconds: float = 0.0,
) -> dict[str, Any]:
    """Latency of ``module(*inputs)`` in torch (inference mode) with ``threads`` threads; the
    previous thread count is restored afterwards. Same keys as :func:`benchmark`."""
    mod = module.module if isinstance(module, Graph) else module
    xs = tuple(torch.as_tensor(x) for x in _as_inputs(inputs))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            times = _timed(lambda: mod(*xs), warmup, runs, min_seconds)
    finally:
        torch.set_num_threads(before)
    result = _stats(times, threads)
    result["batch"] = int(xs[0].shape[0]) if xs and xs[0].dim() else 0
    return result
