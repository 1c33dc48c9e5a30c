"""The C backend's view of an ONNX model: static shapes, constants folded, one list of nodes.

``load(model_or_path)`` turns an ONNX model into a :class:`Program`:

1. local functions are inlined (newer exporters emit them);
2. every graph input gets a static shape: a symbolic *batch* dimension (dimension 0) is fixed
   to 1, any other symbolic dimension is an error naming the input (pass ``input_shapes`` to
   choose them);
3. ``onnx.shape_inference`` checks the model and gives the shapes the kernels are checked
   against;
4. initializers, ``Constant`` nodes, ``Shape``/``Size`` of statically shaped tensors and every
   node whose inputs are all constant are folded (the latter with ``onnx.reference``), so
   shape-computing subgraphs never reach the C code;
5. each remaining node is checked against the op table (``ops``): its output shapes and
   dtypes are computed there, or the reason it is unsupported is recorded. All reasons are
   collected and raised together as one :class:`~graphopt.errors.BackendError`, before any
   file is written.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.errors import BackendError

log = logging.getLogger(__name__)

# numpy dtype -> C type. Only these dtypes reach the C code.
C_TYPES: dict[np.dtype, str] = {
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
    np.dtype(np.int8): "int8_t",
    np.dtype(np.int16): "int16_t",
    np.dtype(np.int32): "int32_t",
    np.dtype(np.int64): "int64_t",
    np.dtype(np.uint8): "uint8_t",
    np.dtype(np.uint16): "uint16_t",
    np.dtype(np.uint32): "uint32_t",
    np.dtype(np.uint64): "uint64_t",
    np.dtype(np.bool_): "uint8_t",
}
FLOAT = np.dtype(np.float32)
# ops whose value depends on nothing but their inputs and attributes (safe to fold)
_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "Dropout",
}


class UnsupportedError(BackendError):
    """The model uses ops, attributes or dtypes the C backend does not compile."""


class Unsupported(Exception):
    """Raised by an op's ``infer`` when one attribute, dtype or shape is not supported."""


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    value: np.ndarray | None = None  # set for constants
    # a constant folded from DequantizeLinear keeps its integer form: q, scale, zp, axis
    qinfo: dict[str, Any] | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ctype(self) -> str:
        return C_TYPES[self.dtype]

    @property
    def is_const(self) -> bool:
        return self.value is not None


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]  # "" marks an omitted optional input
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    extra: dict[str, Any] = field(default_factory=dict)  # filled by the op's infer()

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def describe(self) -> str:
        return f"{self.op} node {self.name!r}"


@dataclass
class Program:
    name: str
    nodes: list[Node]
    tensors: dict[str, Tensor]
    inputs: list[str]
    outputs: list[str]
    opset: int
    folded: int = 0  # nodes folded into constants
    notes: list[str] = field(default_factory=list)  # lowering decisions worth reporting

    def t(self, name: str) -> Tensor:
        return self.tensors[name]


def load_proto(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        return proto
    path = Path(model)
    if not path.exists():
        raise BackendError(f"ONNX file {path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise BackendError(f"cannot read ONNX file {path}: {e}") from e


def _default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def _fix_input_shapes(
    proto: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None
) -> None:
    init_names = {i.name for i in proto.graph.initializer}
    given = dict(input_shapes or {})
    for inp in proto.graph.input:
        if inp.name in init_names:
            continue
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise UnsupportedError(
                f"graph input {inp.name!r} is not a tensor (sequences, maps and "
                "optionals are not supported by the C backend)"
            )
        if inp.name in given:
            shape = tuple(int(d) for d in given.pop(inp.name))
            del tt.shape.dim[:]
            for d in shape:
                tt.shape.dim.add().dim_value = d
            continue
        if not tt.HasField("shape"):
            raise BackendError(
                f"graph input {inp.name!r} has no shape; pass input_shapes={{{inp.name!r}: (...)}}"
            )
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value >= 0:
                continue
            if i == 0:
                log.info(
                    "graph input %r: symbolic batch dimension %r fixed to 1",
                    inp.name,
                    d.dim_param or "?",
                )
                d.Clear()
                d.dim_value = 1
            else:
                raise BackendError(
                    f"graph input {inp.name!r} has symbolic dimension {i} "
                    f"({d.dim_param or '?'}); the C backend needs static shapes: pass "
                    f"input_shapes={{{inp.name!r}: (...)}}"
                )
    if given:
        raise BackendError(f"input_shapes names unknown graph inputs: {sorted(given)}")


def _value_info(proto: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...] | None, int]]:
    """name -> (static shape or None, elem_type) from ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as e:
        raise BackendError(f"ONNX shape inference failed: {str(e).splitlines()[0]}") from e
    out: dict[str, tuple[tuple[int, ...] | None, int]] = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shape = tuple(int(d.dim_value) for d in tt.shape.dim)
        out[vi.name] = (shape, tt.elem_type)
    return out


def _np_dtype(elem_type: int, what: str) -> np.dtype:
    try:
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        raise UnsupportedError(f"{what}: ONNX element type {elem_type} is not supported") from None
    return dt


def _fold(node: onnx.NodeProto, values: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if v is not None else "" for k, v in enumerate(values)]
    n = onnx.NodeProto()
    n.CopyFrom(node)
    del n.input[:]
    n.input.extend(names)
    del n.output[:]
    n.output.extend([f"o{k}" if o else "" for k, o in enumerate(node.output)])
    ev = ReferenceEvaluator(n, opsets={"": opset})
    feeds = {nm: v for nm, v in zip(names, values) if nm}
    res = ev.run(None, feeds)
    return [np.asarray(r) for r in res]


def _gather_elements(values: list[np.ndarray | None], attrs: dict[str, Any]) -> list[np.ndarray]:
    """GatherElements: ``y[..., j, ...] = data[..., indices[..., j, ...], ...]`` along
    ``axis``; the indices may be shorter than the data along the other axes."""
    data, idx = values[0], np.asarray(values[1], np.int64)
    axis = int(attrs.get("axis", 0)) % data.ndim
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    part = tuple(slice(None) if d == axis else slice(0, idx.shape[d]) for d in range(data.ndim))
    return [np.take_along_axis(data[part], idx, axis)]


# folded with numpy: onnx.reference fails on these (GatherElements with indices shorter than
# the data along another axis, as torch.export's BERT position ids have)
_NUMPY_FOLDS = {"GatherElements": _gather_elements}
# ops this module folds itself whenever their input's shape is known
_SHAPE_OPS = {"Shape", "Size"}


def load(
    model: onnx.ModelProto | str | os.PathLike,
    ops: dict[str, Any],
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Program:
    """Load ``model`` into a :class:`Program`, checking every node against ``ops``."""
    proto = load_proto(model)
    if proto.functions:
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
    opset = _default_opset(proto)
    _fix_input_shapes(proto, input_shapes)
    inferred = _value_info(proto)
    g = proto.graph
    tensors: dict[str, Tensor] = {}
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        tensors[init.name] = Tensor(init.name, tuple(arr.shape), arr.dtype, arr)
    for sparse in g.sparse_initializer:
        raise UnsupportedError(f"sparse initializer {sparse.values.name!r} is not supported")
    inputs = []
    for inp in g.input:
        if inp.name in tensors:
            continue
        tt = inp.type.tensor_type
        dt = _np_dtype(tt.elem_type, f"graph input {inp.name!r}")
        tensors[inp.name] = Tensor(inp.name, tuple(int(d.dim_value) for d in tt.shape.dim), dt)
        inputs.append(inp.name)
    outputs = [o.name for o in g.output]

    nodes: list[Node] = []
    unsupported_ops: dict[str, list[str]] = defaultdict(list)
    reasons: list[str] = []
    unknown: set[str] = set()  # tensors whose shape is unknown after an unsupported node
    folded = 0
    for k, onode in enumerate(g.node):
        name = onode.name or f"{onode.op_type}_{k}"
        op = onode.op_type
        domain = onode.domain if onode.domain not in ("", "ai.onnx") else ""
        full = f"{domain}::{op}" if domain else op
        missing = [i for i in onode.input if i and i not in tensors and i not in unknown]
        if missing:
            raise BackendError(
                f"{full} node {name!r} reads {missing[0]!r}, which no earlier "
                "node produces (the graph is not topologically sorted?)"
            )
        if any(i in unknown for i in onode.input if i):
            unknown.update(o for o in onode.output if o)
            if domain or (op not in ops and op not in _SHAPE_OPS):
                unsupported_ops[full].append(name)
            continue
        ins = [tensors[i] if i else None for i in onode.input]
        attrs = {a.name: helper.get_attribute_value(a) for a in onode.attribute}
        # -- constant folding ----------------------------------------------------------------
        value_list = None
        if not domain:
            if op == "Constant":
                value_list = [_constant_value(onode, attrs, name)]
            elif op in ("Shape", "Size") and ins and ins[0] is not None:
                value_list = _fold(onode, [np.zeros(ins[0].shape, ins[0].dtype)], opset)
            elif (
                ins
                and all(t is None or t.is_const for t in ins)
                and op not in _NONDETERMINISTIC
                and not any(
                    a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for a in onode.attribute
                )
            ):
                try:
                    values = [t.value if t is not None else None for t in ins]
                    if op in _NUMPY_FOLDS:
                        value_list = _NUMPY_FOLDS[op](values, attrs)
                    else:
                        value_list = _fold(onode, values, opset)
                except Exception as e:
                    log.debug("cannot fold %s %r: %s", op, name, e)
                    value_list = None
        if value_list is not None:
            for oname, v in zip(onode.output, value_list):
                if oname:
                    tensors[oname] = Tensor(oname, tuple(v.shape), v.dtype, v)
            if op == "DequantizeLinear" and not attrs.get("block_size"):
                zp = ins[2].value if len(ins) > 2 and ins[2] is not None else None
                tensors[onode.output[0]].qinfo = {
                    "q": ins[0].value,
                    "scale": ins[1].value,
                    "zp": np.zeros_like(ins[0].value, shape=()) if zp is None else zp,
                    "axis": int(attrs.get("axis", 1)),
                }
            folded += 1
            continue
        # -- a node for the C code -----------------------------------------------------------
        if domain or op not in ops:
            unsupported_ops[full].append(name)
            unknown.update(o for o in onode.output if o)
            continue
        node = Node(op, name, list(onode.input), list(onode.output), attrs, opset)
        try:
            for t in ins:
                if t is not None and t.dtype not in C_TYPES:
                    raise Unsupported(f"dtype {t.dtype} of input {t.name!r}")
            results = ops[op].infer(node, ins)
        except Unsupported as e:
            reasons.append(f"{node.describe()}: {e}")
            unknown.update(o for o in onode.output if o)
            continue
        for oname, (shape, dt) in zip(node.outputs, results):
            if not oname:
                continue
            shape = tuple(int(d) for d in shape)
            ref = inferred.get(oname)
            if ref is not None and ref[0] is not None and ref[0] != shape:
                raise BackendError(
                    f"{node.describe()}: output {oname!r} has shape {shape} "
                    f"here but {ref[0]} by ONNX shape inference"
                )
            tensors[oname] = Tensor(oname, shape, np.dtype(dt))
        nodes.append(node)

    for o in outputs:
        if o not in tensors and o not in unknown:
            raise BackendError(f"graph output {o!r} is produced by no node")
    if unsupported_ops or reasons:
        parts = []
        if unsupported_ops:
            parts.append(
                "unsupported ops: "
                + "; ".join(
                    f"{op} ({', '.join(names)})" for op, names in sorted(unsupported_ops.items())
                )
            )
        if reasons:
            parts.append("unsupported uses: " + "; ".join(reasons))
        raise UnsupportedError("the C backend cannot compile this model: " + " | ".join(parts))
    for name in inputs + outputs:
        t = tensors[name]
        if t.dtype not in C_TYPES:
            raise UnsupportedError(
                f"graph tensor {name!r} has dtype {t.dtype}, which the C backend does not support"
            )
    graph_name = g.name or "model"
    return Program(graph_name, nodes, tensors, inputs, outputs, opset, folded)


def _constant_value(node: onnx.NodeProto, attrs: dict[str, Any], name: str) -> np.ndarray:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    if "value_float" in attrs:
        return np.array(attrs["value_float"], np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], np.int64)
    raise UnsupportedError(
        f"Constant node {name!r}: attribute {sorted(attrs)} is not supported "
        "(strings and sparse tensors cannot be compiled)"
    )
