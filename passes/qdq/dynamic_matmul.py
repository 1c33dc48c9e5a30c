"""``qdq(activations=dynamic, matmul=...)``: matrix products of two activations.

A product ``a @ b`` of two float32 activations (attention's ``q kᵀ`` and ``p v``,
``torch.matmul``/``bmm``) becomes ``graphopt::dynamic_matmul``
(:mod:`graphopt.quant.dynamic`): both operands quantized per tensor at run time,
``y = s_a s_b Σ_k (a_q - z_a)(b_q - z_b)``. ``matmul=values`` leaves the products that feed a
softmax (the scores) in float, ``matmul=float`` all of them; a product with a constant operand
stays float (it is a weight: a Linear's job).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.graph import Graph, node_meta
from graphopt.passes.qdq.placement import matches
from graphopt.passes.qdq.rewrite import node_sqnr

_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm"}
# between a q kT product and its softmax: scaling, masking, bias (one input each step)
_SCORE_FUNCS = {
    operator.mul,
    operator.truediv,
    operator.add,
    operator.sub,
    torch.mul,
    torch.div,
    torch.add,
    torch.where,
    torch.masked_fill,
}
_SCORE_METHODS = {"mul", "div", "add", "sub", "masked_fill", "float", "to", "type_as"}
_SOFTMAX_FUNCS = {torch.softmax, F.softmax}


def _matmul_operands(n: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two operands of a matrix product node (``a @ b``, ``torch.matmul``, ``torch.bmm``,
    ``a.matmul(b)``), or None."""
    if n.op == "call_function" and n.target in _MATMUL_FUNCS:
        pass
    elif n.op == "call_method" and n.target in _MATMUL_METHODS:
        pass
    else:
        return None
    if len(n.args) != 2 or n.kwargs or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    return n.args[0], n.args[1]


def _matmul_refusal(a: fx.Node, b: fx.Node) -> str:
    """Why ``a @ b`` is not quantized dynamically ('' when it is)."""
    if a.op == "get_attr" or b.op == "get_attr":
        return "matmul with a constant operand"
    for v in (a, b):
        meta = node_meta(v)
        if meta.dtype != "float32":
            return f"an operand of dtype {meta.dtype} (float32 only)"
        if not meta.shape or len(meta.shape) < 2:
            return "an operand of rank below 2 or of unknown shape"
    return ""


def _feeds_softmax(n: fx.Node, depth: int = 6) -> bool:
    """Whether ``n`` reaches a softmax through scaling/masking ops only (attention scores)."""
    frontier = [n]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for u in v.users:
                if u.op == "call_function" and u.target in _SOFTMAX_FUNCS:
                    return True
                if u.op == "call_method" and u.target == "softmax":
                    return True
                if u.op == "call_module" and isinstance(
                    u.graph.owning_module.get_submodule(str(u.target)), nn.Softmax
                ):
                    return True
                if (u.op == "call_function" and u.target in _SCORE_FUNCS) or (
                    u.op == "call_method" and u.target in _SCORE_METHODS
                ):
                    nxt.append(u)
        frontier = nxt
    return False


def dynamic_matmuls(
    gm: fx.GraphModule, mode: str, skip: tuple[str, ...], skipped: list
) -> tuple[list[fx.Node], list[dict[str, str]]]:
    """With ``mode`` (``qdq``'s ``matmul=``) ``dynamic``, every matrix product of two float32 activations (not skipped)
    becomes a ``graphopt::dynamic_matmul``, in place (same node name); ``matmul=values`` keeps
    those that feed a softmax (attention scores) float, ``matmul=float`` keeps all. Returns the
    products rewritten, and those left float with the reason (a skipped one goes to
    ``skipped``)."""
    done, float_ops = [], []
    for n in list(gm.graph.nodes):
        operands = _matmul_operands(n)
        if operands is None:
            continue
        row = {"node": n.name, "module": node_meta(n).module_path or ""}
        pat = matches(skip, n)
        if pat is not None:
            skipped.append({**row, "reason": f"skip ({pat})"})
            continue
        why = _matmul_refusal(*operands)
        if not why and mode == "float":
            why = "matmul=float (products of two activations stay float)"
        elif not why and mode == "values" and _feeds_softmax(n):
            why = "attention scores (matmul=values): the softmax reads them in float"
        if why:
            float_ops.append({**row, "op": "matmul", "reason": why})
            continue
        n.op, n.target = "call_function", torch.ops.graphopt.dynamic_matmul.default
        n.args = operands
        done.append(n)
    return done, float_ops


def matmul_report(
    float_graph: Graph, gm: fx.GraphModule, nodes: list[fx.Node], inputs: tuple[torch.Tensor, ...]
) -> list[dict[str, Any]]:
    """Per dynamic matmul: the SQNR (dB) of its output against the float model's, on
    ``inputs`` (the error of its own operands' rounding and of every int8 layer before it)."""
    if not nodes:
        return []
    sqnr = node_sqnr(float_graph, gm, {n.name: n.name for n in nodes}, inputs)
    rows = []
    for n in nodes:
        row: dict[str, Any] = {
            "node": n.name,
            "module": node_meta(n).module_path or "",
            "op": "matmul (dynamic)",
            "scores": _feeds_softmax(n),
        }
        if n.name in sqnr:
            row["sqnr_db"] = sqnr[n.name]
        rows.append(row)
    return rows
