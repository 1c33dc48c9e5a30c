"""Where quantize/dequantize pairs go: fusion units and quantized values.

ONNX Runtime turns ``DequantizeLinear -> op -> QuantizeLinear`` groups into integer kernels
only when a group matches exactly: every activation input comes from a DequantizeLinear, the
weight is an int8 initializer behind a DequantizeLinear, the bias an int32 one, and the op's
only consumer is a QuantizeLinear. It first drops a Relu / Clip that feeds a QuantizeLinear
whose representable range lies inside the activation's (zero point ``qmin`` for Relu). So:

- a **unit** is a quantizable op (Conv, Linear, Add, Mul, MatMul, Concat, average pooling)
  plus the clamping activation (ReLU, ReLU6, Hardtanh, clamp) that is its only consumer; its
  activation inputs and its output are quantized, nothing in between. A Linear on a 2-D input
  exports as Gemm (ORT: QGemm); on tokens ``[B, T, C]`` as MatMul on the int8 weight, then the
  bias Add: ORT runs ``DQ -> MatMul`` as MatMulIntegerToFloat (int32 accumulation, float
  output), the bias Add in float and the output's QuantizeLinear after it, which is what the
  torch form computes (a bias-free MatMul with a Q after it becomes QLinearMatMul);
- **attention scores** (a softmax's input, back through its scale and mask arithmetic) stay
  float: the ``q kᵀ`` matmul keeps int8 inputs and writes float (MatMulIntegerToFloat) and the
  softmax runs in float; its output is quantized for ``p v`` (QLinearMatMul). ORT would turn a
  ``DQ -> Softmax -> Q`` group into QLinearSoftmax, whose table-based exp differs from float
  softmax by a step on about a tenth of the probabilities, and that difference would grow
  through the layers after it;
- **pass-through** ops (max-pool, flatten, reshape/view, permute/transpose, squeeze) whose
  input is quantized get a pair with the *same* qparams after them (ORT drops such pairs
  and runs the op on int8); max-pool and reshapes only move values, so this is exact;
- **transparent** ops (eval-mode dropout, identity, contiguous) are erased by the exporter and
  get no pair of their own;
- everything else stays float; when it sits between quantized values the plan says so.

Each quantized value is either **own** (an observer calibrates it) or **shared** (a
pass-through output using its root's qparams).
"""

from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.graph import node_meta
from graphopt.optypes import (
    AVG_POOL,
    AVG_POOL_FUNCS,
    CONV,
    CONV_T,
    DROPOUT,
    DROPOUT_FUNCS,
    MAX_POOL,
    MAX_POOL_FUNCS,
    call_sites,
)

UNIT_KINDS = ("conv", "linear", "matmul", "add", "mul", "cat", "avgpool")
INF = math.inf


@dataclass
class Kind:
    """What a node is to the placement: ``kind`` and, for activations, its clamp bounds."""

    kind: str  # conv, linear, matmul, add, mul, cat, avgpool, act, pass, alias, float
    bounds: tuple[float, float] | None = None
    reason: str = ""


@dataclass
class Unit:
    op: fx.Node
    kind: str
    out: fx.Node
    inputs: list[fx.Node]
    act: fx.Node | None = None
    bounds: tuple[float, float] | None = None

    @property
    def module_path(self) -> str:
        return node_meta(self.op).module_path or ""


@dataclass
class Plan:
    units: list[Unit] = field(default_factory=list)
    own: dict[fx.Node, tuple[float, float] | None] = field(default_factory=dict)
    shared: dict[fx.Node, fx.Node] = field(default_factory=dict)
    alias: dict[fx.Node, fx.Node] = field(default_factory=dict)
    float_ops: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    float_outputs: dict[fx.Node, str] = field(default_factory=dict)  # unit output -> why

    def root(self, node: fx.Node) -> fx.Node | None:
        """The own-quantized value whose qparams ``node`` uses (``None`` if it is float)."""
        if node in self.own:
            return node
        return self.shared.get(node) or self.alias.get(node)


_MAXPOOL = MAX_POOL
_AVGPOOL = AVG_POOL
_ALIAS_MODULES = (*DROPOUT, nn.Identity)
_PASS_FUNCS = {
    torch.flatten,
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.squeeze,
    torch.unsqueeze,
    torch.unflatten,
    *MAX_POOL_FUNCS,
}
_PASS_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
}
_ALIAS_FUNCS = DROPOUT_FUNCS
_AVG_FUNCS = AVG_POOL_FUNCS
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm}
_CAT = {torch.cat, torch.concat}
# monotone heads: a linear/matmul feeding only these (and then the model output) keeps float
# logits (QGemm / MatMulIntegerToFloat write float), never a coarse int8 step before them
_HEAD_FUNCS = {torch.sigmoid, F.sigmoid, torch.softmax, F.softmax, F.log_softmax, torch.tanh}
_HEAD_MODULES = (nn.Sigmoid, nn.Softmax, nn.LogSoftmax, nn.Tanh)
_HEAD_METHODS = {"sigmoid", "softmax", "log_softmax", "tanh"}


# why the float ops of a transformer stay float (the report says it per node)
_LAYER_NORM_WHY = (
    "in ORT: it normalises in float between a DequantizeLinear and the next unit's QuantizeLinear"
)
_FLOAT_WHY = {
    "layernorm": _LAYER_NORM_WHY,
    "layer_norm": _LAYER_NORM_WHY,
    "softmax": "that equals float softmax (ORT's QLinearSoftmax rounds a table exp a step "
    "apart on about a tenth of the outputs); it runs in float on float scores",
    "gelu": "in ORT (Erf / Gelu run in float); the next unit quantizes its output",
}


def _no_kernel(name: str, key: str | None = None) -> str:
    why = _FLOAT_WHY.get((key or name).lower())
    return f"{name} has no integer kernel" + (f" {why}" if why else "")


def _is_float_tensor(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    dtype = node_meta(node).dtype
    return dtype is not None and dtype.startswith(("float", "bfloat"))


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _clamp_bounds(node: fx.Node, first: int, names=("min", "max")) -> tuple[float, float] | None:
    lo, hi = _arg(node, first, names[0]), _arg(node, first + 1, names[1])
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        return None
    return (-INF if lo is None else float(lo), INF if hi is None else float(hi))


def classify(node: fx.Node, gm: fx.GraphModule, sites: dict[str, int]) -> Kind:
    """The placement kind of ``node``."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        t = type(mod)
        if t in CONV:
            if mod.padding_mode != "zeros":
                return Kind("float", reason=f"conv with padding_mode={mod.padding_mode!r}")
            if sites.get(str(node.target), 0) > 1:
                return Kind("float", reason="conv module called at several places")
            if len(node.args) != 1 or node.kwargs:
                return Kind("float", reason="conv called with extra arguments")
            return Kind("conv")
        if t is nn.Linear:
            shape = node_meta(node.args[0]).shape if node.args else None
            if sites.get(str(node.target), 0) > 1:
                return Kind("float", reason="linear module called at several places")
            if shape is None or len(shape) < 2:
                return Kind("float", reason="linear on a 1-D input")
            return Kind("linear")
        if t is nn.ReLU:
            return Kind("act", (0.0, INF))
        if t is nn.ReLU6:
            return Kind("act", (0.0, 6.0))
        if t is nn.Hardtanh:
            return Kind("act", (float(mod.min_val), float(mod.max_val)))
        if isinstance(mod, _MAXPOOL):
            return (
                Kind("float", reason="max-pool returns indices")
                if mod.return_indices
                else Kind("pass")
            )
        if t in (nn.Flatten, nn.Unflatten):
            return Kind("pass")
        if isinstance(mod, _ALIAS_MODULES):
            return Kind("alias")
        if isinstance(mod, _AVGPOOL):
            return Kind("avgpool")
        if isinstance(mod, CONV_T):
            return Kind("float", reason="transposed convolution is not quantized yet")
        return Kind("float", reason=_no_kernel(t.__name__))
    if node.op == "call_function":
        fn = node.target
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if fn in _ADD or fn in _MUL:
            if (
                len(node.args) == 2
                and all(_is_float_tensor(a) for a in node.args)
                and not (node.kwargs)
            ):
                return Kind("add" if fn in _ADD else "mul")
            return Kind("float", reason="arithmetic with a constant or extra arguments")
        if fn in _MATMUL:
            if len(tensors) == 2 and all(_is_float_tensor(a) for a in tensors):
                return Kind("matmul")
            return Kind("float", reason="matmul with a constant operand")
        if fn in _CAT:
            items = node.args[0] if node.args else node.kwargs.get("tensors")
            if isinstance(items, (list, tuple)) and all(_is_float_tensor(a) for a in items):
                return Kind("cat")
            return Kind("float", reason="concat of non-tensor items")
        if fn in (F.relu, torch.relu):
            return Kind("act", (0.0, INF))
        if fn is F.relu6:
            return Kind("act", (0.0, 6.0))
        if fn is F.hardtanh:
            b = _clamp_bounds(node, 1, ("min_val", "max_val"))
            return Kind("act", b or (-1.0, 1.0))
        if fn in (torch.clamp, torch.clip):
            b = _clamp_bounds(node, 1)
            return Kind("act", b) if b else Kind("float", reason="clamp with tensor bounds")
        if fn in _PASS_FUNCS:
            if fn in (F.max_pool1d, F.max_pool2d, F.max_pool3d) and _arg(
                node, 6, "return_indices", False
            ):
                return Kind("float", reason="max-pool returns indices")
            return Kind("pass")
        if fn in _ALIAS_FUNCS:
            return Kind("alias")
        if fn in _AVG_FUNCS:
            return Kind("avgpool")
        name = getattr(fn, "__name__", str(fn))
        return Kind("float", reason=_no_kernel(name))
    if node.op == "call_method":
        m = str(node.target)
        if m in _PASS_METHODS:
            return Kind("pass")
        if m == "contiguous":
            return Kind("alias")
        if m in ("relu", "relu_"):
            return Kind("act", (0.0, INF))
        if m in ("clamp", "clip", "clamp_", "clip_"):
            b = _clamp_bounds(node, 1)
            return Kind("act", b) if b else Kind("float", reason="clamp with tensor bounds")
        if m in ("add", "add_", "mul", "mul_") and len(node.args) == 2:
            if all(_is_float_tensor(a) for a in node.args) and not node.kwargs:
                return Kind("add" if m.startswith("add") else "mul")
        return Kind("float", reason=_no_kernel(f"Tensor.{m}", m))
    return Kind("float", reason=node.op)


def _is_head(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in _HEAD_FUNCS
    if node.op == "call_method":
        return str(node.target) in _HEAD_METHODS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _HEAD_MODULES)
    return False


_SOFTMAX_FUNCS = {torch.softmax, F.softmax}
_SCORE_FUNCS = {*_MUL, *_ADD, operator.truediv, torch.where, torch.masked_fill}
_SCORE_METHODS = {"mul", "add", "div", "masked_fill", "masked_fill_"}


def _is_softmax(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in _SOFTMAX_FUNCS
    if node.op == "call_method":
        return str(node.target) == "softmax"
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Softmax)


def softmax_inputs(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Attention scores: the value a softmax reads and, back through element-wise score
    arithmetic used only there (scale, mask add, ``where``), the values before it, up to the
    matmul that made them. They stay float: ORT turns ``DQ -> Softmax -> Q`` into QLinearSoftmax,
    whose table-based exp differs from a float softmax by a step on about a tenth of the
    probabilities (and int8 scores are the coarsest place to round); from a float input ORT
    runs Softmax in float and the product before it as MatMulIntegerToFloat."""
    out: dict[fx.Node, str] = {}
    todo = [n.args[0] for n in gm.graph.nodes if _is_softmax(n, gm) and n.args]
    while todo:
        a = todo.pop()
        if not isinstance(a, fx.Node) or a in out or len(a.users) != 1:
            continue
        out[a] = "attention scores: a softmax input stays float"
        score_op = (a.op == "call_function" and a.target in _SCORE_FUNCS) or (
            a.op == "call_method" and str(a.target) in _SCORE_METHODS
        )
        if score_op:
            todo.extend(x for x in a.args if _is_float_tensor(x))
    return out


def feeds_only_outputs(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Every use of ``node`` is a model output, or a monotone head (sigmoid, softmax, tanh)
    whose uses are model outputs in turn."""
    return all(
        u.op == "output" or (_is_head(u, gm) and feeds_only_outputs(u, gm)) for u in node.users
    )


def _unit_inputs(node: fx.Node, kind: str) -> list[fx.Node]:
    if kind in ("conv", "linear", "avgpool"):
        return [node.args[0]]
    if kind == "cat":
        items = node.args[0] if node.args else node.kwargs["tensors"]
        return list(items)
    return [a for a in node.args if isinstance(a, fx.Node)]


def matches(patterns: tuple[str, ...], node: fx.Node) -> str | None:
    meta = node_meta(node)
    names = [meta.module_path or "", *meta.provenance, node.name]
    if node.op == "call_module":
        names.append(str(node.target))
    for pat in patterns:
        for name in names:
            if name and fnmatch.fnmatchcase(name, pat):
                return pat
    return None


def describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def plan(gm: fx.GraphModule, skip: tuple[str, ...] = ()) -> Plan:
    """The quantization plan of ``gm`` (shapes and dtypes must be propagated)."""
    sites = call_sites(gm)
    kinds = {n: classify(n, gm, sites) for n in gm.graph.nodes}
    scores = softmax_inputs(gm)
    for n, why in scores.items():  # score arithmetic (a mask add) is no unit of its own
        if kinds[n].kind in ("add", "mul", "act"):
            kinds[n] = Kind("float", reason=why)
    result = Plan()
    output_values = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            output_values = {a for a in n.all_input_nodes}

    # units: a quantizable op, plus the activation that is its only consumer
    fused_acts: set[fx.Node] = set()
    for n in gm.graph.nodes:
        k = kinds[n]
        if k.kind not in UNIT_KINDS:
            continue
        if not _is_float_tensor(n):
            kinds[n] = Kind("float", reason="output is not a float tensor")
            continue
        pat = matches(skip, n)
        if pat is not None:
            result.skipped.append(
                {"node": n.name, "module": node_meta(n).module_path or "", "skip": pat}
            )
            kinds[n] = Kind("float", reason=f"skipped ({pat})")
            continue
        inputs = _unit_inputs(n, k.kind)
        if not all(_is_float_tensor(a) for a in inputs):
            kinds[n] = Kind("float", reason="an input is not a float tensor")
            continue
        unit = Unit(n, k.kind, n, inputs)
        users = list(n.users)
        if len(users) == 1 and n not in output_values:
            (u,) = users
            uk = kinds[u]
            if uk.kind == "act" and u.args and u.args[0] is n and matches(skip, u) is None:
                unit.out, unit.act, unit.bounds = u, u, uk.bounds
                fused_acts.add(u)
        result.units.append(unit)

    needed: dict[fx.Node, tuple[float, float] | None] = {}
    for unit in result.units:
        for a in unit.inputs:
            needed.setdefault(a, None)
    for unit in result.units:
        # a linear/matmul whose result is only a model output (perhaps through a sigmoid or
        # softmax) stays float: ORT's QGemm / MatMulIntegerToFloat take int8 inputs and write
        # float, so the logits keep full precision
        why = None
        if unit.kind in ("linear", "matmul") and unit.act is None and unit.out not in needed:
            if feeds_only_outputs(unit.out, gm):
                why = (
                    "model output: int8 inputs, float output (ORT: QGemm / "
                    "MatMulIntegerToFloat), no int8 step on the logits"
                )
            elif unit.out in scores:
                why = (
                    "attention scores: int8 inputs, float output (ORT: MatMulIntegerToFloat) "
                    "for a float softmax"
                )
        if why:
            result.float_outputs[unit.out] = why
        else:
            needed[unit.out] = unit.bounds

    # resolve in topological order: pass-through ops follow their input
    for n in gm.graph.nodes:
        k = kinds[n]
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        root = result.root(src) if src is not None else None
        if k.kind in ("pass", "alias") and root is not None and _is_float_tensor(n):
            (result.alias if k.kind == "alias" else result.shared)[n] = root
        elif n in needed:
            result.own[n] = needed[n]
        elif k.kind == "act" and n not in fused_acts and root is not None and _is_float_tensor(n):
            result.own[n] = k.bounds

    # float ops that read or feed quantized values
    for n in gm.graph.nodes:
        k = kinds[n]
        if k.kind != "float" or n.op in ("placeholder", "output", "get_attr"):
            continue
        reads = any(result.root(a) is not None for a in n.all_input_nodes)
        feeds = n in result.own
        if reads or feeds:
            result.float_ops.append(
                {
                    "node": n.name,
                    "module": node_meta(n).module_path or "",
                    "op": describe(n),
                    "reason": k.reason or "not quantizable",
                }
            )
    return result
