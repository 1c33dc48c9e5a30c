"""The graph rewrites behind ``qdq``: observers in, calibration, the fake-quant form, bias
correction and the integer form.

Every rewrite keeps node names and module paths: a quantize/dequantize pair after value ``v``
gets ``v``'s module path, so the exported QuantizeLinear/DequantizeLinear name the module.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.errors import DataError, GraphoptError
from graphopt.graph import Graph, TensorInfo, node_meta
from graphopt.optypes import DROPOUT, DROPOUT_FUNCS
from graphopt.passes.qdq.placement import Plan, Unit
from graphopt.quant.dynamic import DynamicQuantLinear
from graphopt.quant.modules import (
    DQ_OPS,
    Q_OPS,
    FakeQuant,
    Observer,
    QATConv,
    QATLinear,
    QuantConv,
    QuantLinear,
    _QATWeighted,
    qd,
)
from graphopt.quant.modules import to_integer as integer_layer
from graphopt.quant.observers import QParams, RangeObserver, affine_qparams, sqnr_db

log = logging.getLogger(__name__)

_ALIAS_MODULE_TYPES = (*DROPOUT, nn.Identity)
_ALIAS_FUNCS = tuple(DROPOUT_FUNCS)


class QuantizationError(GraphoptError):
    """The graph cannot be quantized as asked (already quantized, nothing to convert)."""


# -- inspection ---------------------------------------------------------------------------------
def quantization_state(gm: fx.GraphModule) -> str:
    """``"float"``, ``"qat"`` (fake-quant modules), ``"integer"`` (quantize/dequantize ops) or
    ``"calibrating"`` (observers left behind)."""
    state = "float"
    for n in gm.graph.nodes:
        if n.op == "call_function" and (n.target in Q_OPS or n.target in DQ_OPS):
            return "integer"
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            if isinstance(mod, (QuantConv, QuantLinear, DynamicQuantLinear)):
                return "integer"
            if isinstance(mod, (FakeQuant, _QATWeighted)):
                state = "qat"
            elif isinstance(mod, Observer) and state == "float":
                state = "calibrating"
    return state


def set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _fresh_name(gm: fx.GraphModule, stem: str) -> str:
    stem = re.sub(r"\W", "_", stem)
    for i in itertools.count():
        name = stem if i == 0 else f"{stem}_{i}"
        if not hasattr(gm, name):
            return name
    raise AssertionError  # pragma: no cover


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    meta, new = node_meta(src), node_meta(dst)
    new.module_path = meta.module_path
    new.module_type = meta.module_type
    new.outputs = [TensorInfo(o.shape, o.dtype) for o in meta.outputs]
    new.provenance = list(meta.provenance)


def _insert_after(
    gm: fx.GraphModule, value: fx.Node, make: Callable[[fx.Node], fx.Node]
) -> fx.Node:
    """Insert ``make(value)`` right after ``value`` and route every other user of ``value`` to
    the new node's result."""
    users = list(value.users)
    with gm.graph.inserting_after(value):
        new = make(value)
    for u in users:
        u.replace_input_with(value, new)
    return new


# -- calibration ----------------------------------------------------------------------------------
def insert_observers(
    gm: fx.GraphModule, plan: Plan, method: Callable[[fx.Node], tuple[str, float]]
) -> dict[fx.Node, RangeObserver]:
    """An :class:`Observer` after each own-quantized value, calibrating with
    ``method(value) -> (calibration, percentile)``; returns value -> observer."""
    observers: dict[fx.Node, RangeObserver] = {}
    for value in plan.own:
        path = node_meta(value).module_path
        where = f"node {value.name!r}" + (f" (module {path!r})" if path else "")
        obs = RangeObserver(*method(value), where)
        name = _fresh_name(gm, f"{value.name}_observer")
        gm.add_submodule(name, Observer(obs))

        def make(v: fx.Node, name: str = name) -> fx.Node:
            node = gm.graph.call_module(name, (v,))
            _copy_meta(v, node)
            return node

        _insert_after(gm, value, make)
        observers[value] = obs
    gm.recompile()
    return observers


def remove_observers(gm: fx.GraphModule) -> None:
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), Observer):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    gm.delete_all_unused_submodules()
    gm.recompile()


def calibration_batches(
    batches: Iterable[tuple[tuple[torch.Tensor, ...], Any]], limit: int
) -> list[tuple[torch.Tensor, ...]]:
    """The first ``limit`` input tuples (raises when there are none)."""
    out = [inputs for inputs, _ in itertools.islice(batches, limit)]
    if not out:
        raise DataError(
            "qdq got an empty calibration set: pass data= with at least one batch of "
            "representative inputs (CLI: --data NAME)"
        )
    return out


def calibrate(
    gm: fx.GraphModule,
    observers: dict[fx.Node, RangeObserver],
    batches: list[tuple[torch.Tensor, ...]],
    progress: Callable[..., Iterable],
) -> None:
    """Run the batches through ``gm``: one pass for min/max, a second one for histograms when
    the method needs them."""
    passes = 2 if any(o.needs_histograms for o in observers.values()) else 1
    with torch.no_grad():
        for p in range(passes):
            if p == 1:
                for o in observers.values():
                    o.start_histograms()
            desc = "qdq: calibrating" + (f" ({p + 1}/{passes})" if passes > 1 else "")
            for inputs in progress(batches, desc=desc, total=len(batches)):
                gm(*inputs)


def choose_qparams(
    plan: Plan, observers: dict[fx.Node, RangeObserver], dtype: torch.dtype
) -> dict[fx.Node, QParams]:
    qmin, qmax = (0, 255) if dtype == torch.uint8 else (-128, 127)
    out = {}
    for value, bounds in plan.own.items():
        lo, hi = observers[value].range(qmin, qmax)
        out[value] = affine_qparams(lo, hi, dtype, bounds)
    return out


# -- fake-quant form ------------------------------------------------------------------------------
def to_fake_quant(
    gm: fx.GraphModule,
    plan: Plan,
    qparams: dict[fx.Node, QParams],
    per_channel: Callable[[Unit], bool],
    learnable: bool,
    weight_qmax: int = 127,
) -> dict[fx.Node, str]:
    """Replace the plan's values by :class:`FakeQuant` call sites (a shared value calls its
    root's module again) and conv/linear units by :class:`QATConv`/:class:`QATLinear`.
    Returns value -> FakeQuant module name."""
    names: dict[fx.Node, str] = {}
    for value in plan.own:
        name = _fresh_name(gm, f"{value.name}_quant")
        gm.add_submodule(name, FakeQuant(qparams[value], learnable, plan.own[value]))
        names[value] = name
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    todo = sorted([*plan.own, *plan.shared], key=order.__getitem__)
    for value in todo:
        target = names[value] if value in plan.own else names[plan.shared[value]]

        def make(v: fx.Node, target: str = target) -> fx.Node:
            node = gm.graph.call_module(target, (v,))
            _copy_meta(v, node)
            return node

        _insert_after(gm, value, make)
    for unit in plan.units:
        if unit.kind not in ("conv", "linear"):
            continue
        path = str(unit.op.target)
        layer = gm.get_submodule(path)
        cls = QATConv if unit.kind == "conv" else QATLinear
        set_submodule(gm, path, cls(layer, per_channel(unit), learnable, weight_qmax))
    gm.recompile()
    return names


# -- integer form ----------------------------------------------------------------------------------
def _feeding_dq(value: Any) -> fx.Node | None:
    """The dequantize node ``value`` comes from (through transparent ops), or ``None``."""
    cur = value
    while isinstance(cur, fx.Node):
        if cur.op == "call_function" and cur.target in DQ_OPS:
            return cur
        transparent = (
            (cur.op == "call_method" and cur.target == "contiguous")
            or (cur.op == "call_function" and cur.target in _ALIAS_FUNCS)
            or (
                cur.op == "call_module"
                and isinstance(
                    cur.graph.owning_module.get_submodule(str(cur.target)), _ALIAS_MODULE_TYPES
                )
            )
        )
        if not transparent:
            return None
        cur = cur.args[0]
    return None


def _input_scale(node: fx.Node) -> float | None:
    """The scale of the dequantize that feeds ``node``'s first input."""
    dq = _feeding_dq(node.args[0] if node.args else None)
    return float(dq.args[1]) if dq is not None else None


def to_integer(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Freeze the fake-quant form: each :class:`FakeQuant` call becomes
    ``dequantize(quantize(x))`` with its qparams, each QAT layer an int8 :class:`QuantConv` /
    :class:`QuantLinear` whose int32 bias uses the input's scale. Returns module path ->
    ``{"input_scale", "weight_scale"}`` of the converted layers."""
    for n in list(gm.graph.nodes):
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(str(n.target))
        if not isinstance(mod, FakeQuant):
            continue
        qp = mod.qparams()
        args = (qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.dtype)
        with gm.graph.inserting_before(n):
            q = gm.graph.call_function(qd.quantize_per_tensor.default, (n.args[0], *args))
            dq = gm.graph.call_function(qd.dequantize_per_tensor.default, (q, *args))
        _copy_meta(n, q)
        node_meta(q).outputs = [
            TensorInfo(o.shape, str(qp.dtype).replace("torch.", "")) for o in node_meta(n).outputs
        ]
        _copy_meta(n, dq)
        n.replace_all_uses_with(dq)
        gm.graph.erase_node(n)
    converted: dict[str, dict[str, Any]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        layer = gm.get_submodule(str(n.target))
        if not isinstance(layer, _QATWeighted):
            continue
        scale = _input_scale(n)
        if scale is None:
            raise QuantizationError(
                f"cannot convert {n.target!r}: its input does not come from a dequantize node"
            )
        new = integer_layer(layer, scale)
        set_submodule(gm, str(n.target), new)
        converted[str(n.target)] = {"input_scale": scale, "weight_scale": new.weight_scale}
    gm.delete_all_unused_submodules()
    gm.recompile()
    return converted


# -- report ---------------------------------------------------------------------------------------
class _Values(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        v = super().run_node(n)
        if n.name in self.names and isinstance(v, torch.Tensor):
            self.values[n.name] = v.detach()
        return v


def node_sqnr(
    float_graph: Graph, gm: fx.GraphModule, pairs: dict[str, str], inputs: tuple[torch.Tensor, ...]
) -> dict[str, float | None]:
    """SQNR (dB, 2 decimals) of node ``pairs[name]`` of ``gm`` against node ``name`` of the
    float graph, both run on ``inputs``, keyed by ``name`` (pairs missing from either run or
    of different shapes are left out)."""
    with torch.no_grad():
        ref = _Values(float_graph.module, set(pairs))
        ref.run(*inputs)
        got = _Values(gm, set(pairs.values()))
        got.run(*inputs)
    out: dict[str, float | None] = {}
    for name, other in pairs.items():
        a, b = ref.values.get(name), got.values.get(other)
        if a is not None and b is not None and a.shape == b.shape:
            s = sqnr_db(a, b)
            out[name] = None if s is None else round(s, 2)
    return out


def _dequantized(node: fx.Node) -> fx.Node:
    """The dequantize node after ``node``'s quantize, or ``node`` itself."""
    for u in node.users:
        if u.op == "call_function" and u.target in Q_OPS:
            for d in u.users:
                if d.op == "call_function" and d.target in DQ_OPS:
                    return d
    return node


def _qparams_of(dq: fx.Node | None) -> dict[str, Any] | None:
    if dq is None:
        return None
    scale, zp, _, _, dtype = dq.args[1:6]
    return {"scale": float(scale), "zero_point": int(zp), "dtype": str(dtype).replace("torch.", "")}


def _qparams_after(node: fx.Node) -> dict[str, Any] | None:
    d = _dequantized(node)
    return None if d is node else _qparams_of(d)


def unit_report(
    float_graph: Graph, gm: fx.GraphModule, units: list[Unit], inputs: tuple[torch.Tensor, ...]
) -> list[dict[str, Any]]:
    """Per quantized unit: op, module, input and output qparams, weight scales and the SQNR
    (dB) of its dequantized output against the float model's, on ``inputs``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    deq = {u.out.name: _dequantized(nodes[u.out.name]).name for u in units if u.out.name in nodes}
    sqnr = node_sqnr(float_graph, gm, deq, inputs)
    rows = []
    for u in units:
        if u.out.name not in nodes:
            continue
        op = nodes[u.op.name] if u.op.name in nodes else None
        row: dict[str, Any] = {
            "node": u.op.name,
            "module": u.module_path,
            "op": u.kind + (f"+{_act_name(u.act)}" if u.act is not None else ""),
            "inputs": [_qparams_of(_feeding_dq(a)) for a in (op.all_input_nodes if op else [])],
            "output": _qparams_after(nodes[u.out.name]),
        }
        if op is not None and op.op == "call_module":
            layer = gm.get_submodule(str(op.target))
            if isinstance(layer, (QuantConv, QuantLinear)):
                ws = layer.weight_scale
                row["weight_scale"] = (
                    {"min": float(ws.min()), "max": float(ws.max()), "channels": ws.numel()}
                    if ws.numel() > 1
                    else float(ws[0])
                )
        if u.out.name in sqnr:
            row["sqnr_db"] = sqnr[u.out.name]
        rows.append(row)
    return rows


def _act_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(str(node.target))).__name__.lower()
    return getattr(node.target, "__name__", str(node.target)).lower()


def dynamic_report(
    float_graph: Graph, gm: fx.GraphModule, nodes: list[fx.Node], inputs: tuple[torch.Tensor, ...]
) -> list[dict[str, Any]]:
    """Per dynamically quantized Linear: module, weight scales and the SQNR (dB) of its output
    against the float model's, on ``inputs``."""
    sqnr = node_sqnr(float_graph, gm, {n.name: n.name for n in nodes}, inputs)
    rows = []
    for n in nodes:
        ws = gm.get_submodule(str(n.target)).weight_scale
        table = type(gm.get_submodule(str(n.target))).__name__ == "QuantEmbedding"
        row: dict[str, Any] = {
            "node": n.name,
            "module": str(n.target),
            "op": "embedding (int8 rows)" if table else "linear (dynamic)",
            "weight_scale": {
                "min": float(ws.min()),
                "max": float(ws.max()),
                "channels": ws.numel(),
            },
        }
        if n.name in sqnr:
            row["sqnr_db"] = sqnr[n.name]
        rows.append(row)
    return rows
