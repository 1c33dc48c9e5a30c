"""Rewrite QDQ groups of a loaded program into integer kernels (see ``kernels_int8``).

Every rule matches ``DequantizeLinear`` producers (per-tensor scale and zero point) in front of
an op and one ``QuantizeLinear`` consumer (optionally after a Relu or a constant Clip, folded
into the output clamp) and replaces the group by one node that reads and writes the integer
tensors. Groups that match no rule stay on the float path. Dead nodes are dropped at the end.

A Conv, Gemm or MatMul whose input is ``DequantizeLinear`` of an int8/uint8 activation and
whose weight is ``DequantizeLinear`` of an int8/uint8 constant, but whose output is *not*
quantized again (a classifier's last layer), becomes ``QFcFloat_i8`` / ``QConvFloat_i8``:
integer weights, int32 accumulation of ``(x - zx) * (w - zw)`` plus an int32 bias, then
``y = float(acc) * (sx * sw[n])`` (the float32 product of the scales) plus a float bias, if
the bias is not int32: what ORT's QGemm with float output (and MatMulIntegerToFloat)
computes. An int32 bias is ``DequantizeLinear`` of int32 with zero point 0 and scale
``sx * sw[n]`` (to 2^-22 relative; ORT adds such a bias to the accumulator as is); any other
constant bias is added in float. A 1x1 conv over a 1x1 image (after a global pool) lowers as
a fully-connected layer. A group of this shape that cannot be computed exactly this way
(weights quantized along the reduction axis or to other types, Gemm ``alpha``/``beta``/
``transA``, a bias that is not constant or not per output, a possible int32 overflow) stays
float; its reason is logged and kept in ``Program.notes``.

A MatMul of two quantized activations (``DQ(a) x DQ(b)``, attention's ``q kᵀ`` and ``p v``)
becomes ``QMatMul_i8`` when a QuantizeLinear reads it (ORT's QLinearMatMul) or
``QMatMulFloat_i8`` when it stays float (MatMulIntegerToFloat), bit-exact with ORT's kernels
(:mod:`.matmul_q8`); per-channel or 16-bit operands, 1-d operands and a possible int32
overflow keep the float path, with a note.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import numpy as np

from .conv_q8 import fits_int32
from .ir import Node, Program, Tensor, Unsupported
from .kernels_int8 import QTYPES, _multipliers, quantize_multiplier
from .matmul_q8 import fields as _qmm_fields
from .matmul_q8 import overflow_free

log = logging.getLogger(__name__)

_TRANSPARENT = {
    "MaxPool",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Identity",
    "Slice",
    "Concat",
}


def lower_qdq(prog: Program) -> int:
    """Apply the rules until none matches; returns how many groups were lowered."""
    if not any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in prog.nodes):
        return 0
    count = 0
    while True:
        prod = {o: n for n in prog.nodes for o in n.outputs if o}
        cons: dict[str, list[Node]] = defaultdict(list)
        for n in prog.nodes:
            for i in n.inputs:
                if i:
                    cons[i].append(n)
        for node in list(prog.nodes):
            rule = _RULES.get(node.op) or (_transparent if node.op in _TRANSPARENT else None)
            try:
                if rule is not None and rule(prog, node, prod, cons):
                    count += 1
                    break
            except Unsupported as e:  # e.g. a multiplier out of range: keep the float path
                log.debug("QDQ group at %s stays float: %s", node.describe(), e)
        else:
            break
    _dce(prog)
    log.info("lowered %d QDQ groups to integer kernels", count)
    return count


def _dce(prog: Program) -> None:
    while True:
        used = {i for n in prog.nodes for i in n.inputs if i} | set(prog.outputs)
        keep = [n for n in prog.nodes if any(o in used for o in n.outputs if o)]
        if len(keep) == len(prog.nodes):
            return
        prog.nodes = keep


def _qparams(prog: Program, node: Node, qtensor: str):
    s, z = node.extra["s"], node.extra["z"]
    dt = prog.t(qtensor).dtype
    if s.size != 1 or z.size != 1 or dt not in QTYPES:
        return None
    return float(s[0]), int(z[0]), dt


def _src(prog, prod, name):
    """``name`` = DequantizeLinear(xq): (xq, scale, zero point, dtype)."""
    d = prod.get(name)
    if d is None or d.op != "DequantizeLinear":
        return None
    qp = _qparams(prog, d, d.inputs[0])
    return None if qp is None else (d.inputs[0], *qp)


def _const_scalar(prog, node, k, attr, default):
    if node.opset < 11:
        return float(node.attr(attr, default))
    if k < len(node.inputs) and node.inputs[k]:
        v = prog.t(node.inputs[k]).value
        return None if v is None else float(np.asarray(v).reshape(-1)[0])
    return default


def _sink(prog, cons, name, allow_act=True):
    """``name`` -> [Relu | Clip] -> QuantizeLinear: (nodes to drop, yq, scale, zp, dtype,
    lo, hi) with the activation's float bounds."""
    lo, hi = -math.inf, math.inf
    removed = []
    cur = name
    for _ in range(2):
        if cur in prog.outputs or len(cons.get(cur, [])) != 1:
            return None
        u = cons[cur][0]
        if u.op == "QuantizeLinear" and u.inputs[0] == cur:
            qp = _qparams(prog, u, u.outputs[0])
            if qp is None:
                return None
            return [*removed, u], u.outputs[0], *qp, lo, hi
        if not allow_act or removed or u.op not in ("Relu", "Clip"):
            return None
        if u.op == "Relu":
            lo = 0.0
        else:
            lo = _const_scalar(prog, u, 1, "min", -math.inf)
            hi = _const_scalar(prog, u, 2, "max", math.inf)
            if lo is None or hi is None:
                return None
        removed.append(u)
        cur = u.outputs[0]
    return None


def _clamp(s, z, dt, lo, hi) -> tuple[int, int]:
    _, qmin, qmax = QTYPES[dt]
    if lo > -math.inf:
        qmin = max(qmin, z + int(np.round(lo / s)))
    if hi < math.inf:
        qmax = min(qmax, z + int(np.round(hi / s)))
    return qmin, qmax


def _replace(prog, old: Node, new: Node, removed) -> None:
    prog.nodes[prog.nodes.index(old)] = new
    drop = {id(r) for r in removed}
    prog.nodes = [n for n in prog.nodes if id(n) not in drop]


def _int_weights(qi, channels: int, axis: int):
    """(integer weights minus zero points, per-channel scales, C type) or None."""
    q = np.asarray(qi["q"])
    if q.dtype not in QTYPES:
        return None
    s = np.asarray(qi["scale"], np.float64).reshape(-1)
    z = np.asarray(qi["zp"]).astype(np.int32).reshape(-1)
    per = s.size > 1 or z.size > 1
    if per and (qi["axis"] % q.ndim) != axis:
        return None
    if s.size not in (1, channels) or z.size not in (1, channels):
        return None
    shape = [1] * q.ndim
    shape[axis] = -1
    w = q.astype(np.int32) - (z.reshape(shape) if z.size > 1 else z[0])
    wt = "int8_t" if w.min(initial=0) >= -128 and w.max(initial=0) <= 127 else "int16_t"
    w = w.astype(np.int8 if wt == "int8_t" else np.int16)
    return w, np.broadcast_to(s, (channels,)).astype(np.float64), wt


def _int_bias(prog, name, scale):
    if not name:
        return None
    t = prog.t(name)
    if t.value is None:
        raise Unsupported("bias is not a constant")
    b = np.asarray(t.value, np.float64).reshape(-1)
    b = np.round(np.broadcast_to(b, scale.shape) / scale)
    return np.clip(b, -(2**31), 2**31 - 1).astype(np.int32)


def _common(src, sink, ms):
    xq, sx, zx, xdt = src
    removed, yq, sy, zy, ydt, lo, hi = sink
    qmin, qmax = _clamp(sy, zy, ydt, lo, hi)
    qm, qs = _multipliers(ms)
    return dict(
        zx=zx, zy=zy, qmin=qmin, qmax=qmax, qm=qm, qs=qs, xt=QTYPES[xdt][0], yt=QTYPES[ydt][0]
    )


def _fused(removed) -> str | None:
    acts = [f"{r.op} {r.name!r}" for r in removed if r.op in ("Relu", "Clip")]
    return acts[0] if acts else None


def _lower(prog, node, op: str, inputs: list[str], src, sink, ms, **fields) -> bool:
    """Replace ``node`` and its sink (activation, QuantizeLinear) by one integer ``op`` node
    reading ``inputs``; ``ms`` are the requantisation multipliers, ``fields`` go to ``extra``."""
    extra = _common(src, sink, ms)
    extra.update(fields, fused=_fused(sink[0]))
    new = Node(op, node.name, inputs, [sink[1]], node.attrs, node.opset, extra)
    _replace(prog, node, new, sink[0])
    return True


def _conv(prog, node, prod, cons):
    src = _src(prog, prod, node.inputs[0])
    w = prog.t(node.inputs[1])
    if src is None or w.qinfo is None:
        return False
    sink = _sink(prog, cons, node.outputs[0])
    m = w.shape[0]
    iw = _int_weights(w.qinfo, m, 0)
    if sink is None:
        if iw is None:
            return _stays_float(prog, node, _weights_why(w.qinfo, 0))
        return _conv_float(prog, node, src, iw)
    if iw is None:
        return False
    warr, sw, wt = iw
    sx, sy = src[1], sink[2]
    bias = _int_bias(prog, node.inputs[2] if len(node.inputs) > 2 else "", sx * sw)
    fields = dict(geo=node.extra["geo"], w=warr, bias=bias, wt=wt)
    return _lower(prog, node, "QConv_i8", [src[0]], src, sink, sx * sw / sy, **fields)


def _fc(prog, node, prod, cons):
    src = _src(prog, prod, node.inputs[0])
    b = prog.t(node.inputs[1])
    if src is None or b.qinfo is None:
        return False
    sink = _sink(prog, cons, node.outputs[0])
    why = None
    c_name = ""
    if len(b.shape) != 2:
        why = f"a weight of rank {len(b.shape)}"
    elif node.op == "Gemm":
        if (
            int(node.attr("transA", 0))
            or float(node.attr("alpha", 1.0)) != 1.0
            or (len(node.inputs) > 2 and node.inputs[2] and float(node.attr("beta", 1.0)) != 1.0)
        ):
            why = "Gemm with transA, alpha != 1 or beta != 1"
        c_name = node.inputs[2] if len(node.inputs) > 2 else ""
    trans_b = int(node.attr("transB", 0)) if node.op == "Gemm" else 0
    n = b.shape[-1 - trans_b] if len(b.shape) == 2 else 0
    iw = None if why else _int_weights(b.qinfo, n, 0 if trans_b else 1)
    if iw is None:
        why = why or _weights_why(b.qinfo, 0 if trans_b else 1)
    elif c_name and prog.t(c_name).size not in (1, n):
        why = f"a bias of shape {list(prog.t(c_name).shape)}"
    if why:
        return _stays_float(prog, node, why) if sink is None else False
    warr, sw, wt = iw
    if not trans_b:
        warr = np.ascontiguousarray(warr.T)
    x = prog.t(node.inputs[0])
    if sink is None:  # float output: QGemm / MatMulIntegerToFloat
        rows = x.size // x.shape[-1]
        return _float_out(prog, node, "QFcFloat_i8", src, warr, sw, wt, c_name, rows=rows)
    sx, sy = src[1], sink[2]
    bias = _int_bias(prog, c_name, sx * sw)
    fields = dict(w=warr, bias=bias, wt=wt, rows=x.size // x.shape[-1])
    return _lower(prog, node, "QFc_i8", [src[0]], src, sink, sx * sw / sy, **fields)


# -- int8 layers whose output stays float --------------------------------------------------
def _weights_why(qi, axis: int) -> str:
    q = np.asarray(qi["q"])
    if q.dtype not in QTYPES:
        return f"{q.dtype} weights (int8 and uint8 supported)"
    return f"weights quantized per channel along axis {qi['axis']} (needs {axis}: per output)"


def _stays_float(prog, node, why: str, what: str = "its weights stored as float32") -> bool:
    """Record why an int8 layer with float output (or a product of two quantized activations,
    ``what``) keeps the float path; never a match."""
    note = f"{node.describe()} stays float ({what}): {why}"
    if note not in prog.notes:
        prog.notes.append(note)
        log.warning("%s", note)
    return False


def _float_bias(prog, name, sx, sw, n):
    """(int32 bias added to the accumulator, float bias added after scaling): at most one."""
    if not name:
        return None, None
    t = prog.t(name)
    if t.value is None:
        raise Unsupported("the bias is not a constant")
    qi = t.qinfo
    if qi is not None and np.asarray(qi["q"]).dtype == np.int32 and not np.any(qi["zp"]):
        s = np.broadcast_to(np.asarray(qi["scale"], np.float64).reshape(-1), (n,))
        q = np.broadcast_to(np.asarray(qi["q"]).reshape(-1), (n,))
        acc_scale = (np.float32(sx) * sw.astype(np.float32)).astype(np.float64)
        if np.all(np.abs(s - acc_scale) <= 2.0**-22 * acc_scale):  # to a float32 ulp or two
            return np.ascontiguousarray(q, np.int32), None
    fb = np.broadcast_to(np.asarray(t.value, np.float32).reshape(-1), (n,))
    return None, np.ascontiguousarray(fb)


def _float_out(prog, node, op, src, warr, sw, wt, bias_name, rows=None, geo=None):
    """Replace ``node`` by ``op`` (``QFcFloat_i8`` or ``QConvFloat_i8``) reading the integer
    input and writing ``node``'s float output."""
    xq, sx, zx, xdt = src
    n = warr.shape[0]
    try:
        bias, fb = _float_bias(prog, bias_name, sx, sw, n)
    except Unsupported as e:
        return _stays_float(prog, node, str(e))
    if not fits_int32(warr, bias):
        return _stays_float(prog, node, "int32 accumulation could overflow")
    sc = np.float32(sx) * sw.astype(np.float32)  # ORT: a_scale * b_scale[n] in float32
    extra = dict(
        zx=zx, xt=QTYPES[xdt][0], yt="float", wt=wt, w=warr, bias=bias, fb=fb, sc=sc, fused=None
    )
    if rows is not None:
        extra["rows"] = rows
    if geo is not None:
        extra["geo"] = geo
    new = Node(op, node.name, [xq], [node.outputs[0]], node.attrs, node.opset, extra)
    _replace(prog, node, new, [])
    return True


def _conv_float(prog, node, src, iw) -> bool:
    warr, sw, wt = iw
    geo = node.extra["geo"]
    b_name = node.inputs[2] if len(node.inputs) > 2 else ""
    one = geo.KH == geo.KW == geo.H == geo.W == geo.OH == geo.OW == 1 and geo.ph == geo.pw == 0
    if one and geo.G == 1:  # a classifier after a global pool: a fully-connected layer
        w2 = np.ascontiguousarray(warr.reshape(geo.M, geo.C))
        return _float_out(prog, node, "QFcFloat_i8", src, w2, sw, wt, b_name, rows=geo.N)
    return _float_out(prog, node, "QConvFloat_i8", src, warr, sw, wt, b_name, geo=geo)


def _add(prog, node, prod, cons):
    a, b = _src(prog, prod, node.inputs[0]), _src(prog, prod, node.inputs[1])
    if a is None or b is None or a[3] != b[3]:
        return False
    if not prog.t(a[0]).shape == prog.t(b[0]).shape == prog.t(node.outputs[0]).shape:
        return False
    sink = _sink(prog, cons, node.outputs[0])
    if sink is None:
        return False
    sa, sb, sy = a[1], b[1], sink[2]
    twice = 2.0 * max(sa, sb)
    ma, sha = quantize_multiplier(sa / twice)
    mb, shb = quantize_multiplier(sb / twice)
    mo, sho = quantize_multiplier(twice / ((1 << 20) * sy))
    fields = dict(za=a[2], zb=b[2], ma=ma, sa=sha, mb=mb, sb=shb, mo=mo, so=sho)
    return _lower(prog, node, "QAdd_i8", [a[0], b[0]], a, sink, [1.0], **fields)


def _avg(prog, node, prod, cons):
    src = _src(prog, prod, node.inputs[0])
    if src is None:
        return False
    sink = _sink(prog, cons, node.outputs[0])
    if sink is None:
        return False
    x = prog.t(node.inputs[0])
    nd = len(x.shape) - 2
    if not 1 <= nd <= 3:
        return False
    if node.op == "ReduceMean":
        keep = node.extra["keep_shape"]
        if list(keep[:2]) != list(x.shape[:2]) or any(d != 1 for d in keep[2:]):
            return False
    if node.op in ("GlobalAveragePool", "ReduceMean"):
        sp = list(x.shape[2:])
        p = dict(
            out=[1] * nd, kernel=sp, strides=[1] * nd, dilations=[1] * nd, pb=[0] * nd, pe=[0] * nd
        )
        include = 0
    else:
        p = node.extra["p"]
        include = int(node.attr("count_include_pad", 0))
    most = int(np.prod(p["kernel"], dtype=np.int64))
    scale = src[1] / sink[2]
    ms = [0.0] + [scale / c for c in range(1, most + 1)]
    return _lower(prog, node, "QAvgPool_i8", [src[0]], src, sink, ms, p=p, include_pad=include)


def _transparent(prog, node, prod, cons):
    """An op that only moves or selects values: run it on the integers when input and output
    share one scale and zero point."""
    if len([o for o in node.outputs if o]) != 1:
        return False
    data = [k for k, i in enumerate(node.inputs) if i] if node.op == "Concat" else [0]
    srcs = [_src(prog, prod, node.inputs[k]) for k in data]
    if any(s is None for s in srcs):
        return False
    sink = _sink(prog, cons, node.outputs[0], allow_act=False)
    if sink is None:
        return False
    key = sink[2:5]
    if any(tuple(s[1:4]) != key for s in srcs):
        if node.op != "Concat" or any(s[3] != key[2] for s in srcs):
            return False
        # Concat of differently scaled inputs: requantise those to the output's scale first
        for k, src in zip(data, srcs):
            if tuple(src[1:4]) == key:
                continue
            name = f"{src[0]}__requant_{node.name}"
            xt = prog.t(src[0])
            prog.tensors[name] = Tensor(name, xt.shape, xt.dtype)
            _, qmin, qmax = QTYPES[xt.dtype]
            qm, qs = quantize_multiplier(src[1] / key[0])
            req = Node(
                "QRequant_i8",
                f"{node.name}_requant{k}",
                [src[0]],
                [name],
                {},
                node.opset,
                dict(
                    zx=src[2], zy=key[1], qm=qm, qs=qs, qmin=qmin, qmax=qmax, xt=QTYPES[xt.dtype][0]
                ),
            )
            prog.nodes.insert(prog.nodes.index(node), req)
            srcs[data.index(k)] = (name, *key)
    for k, s in zip(data, srcs):
        node.inputs[k] = s[0]
    node.outputs[0] = sink[1]
    _replace(prog, node, node, sink[0])
    return True


# -- products of two quantized activations (attention) --------------------------------------
def _matmul(prog, node, prod, cons):
    """A constant quantized ``B`` is a fully-connected layer; two quantized activations are
    an integer product (:mod:`.matmul_q8`)."""
    return _fc(prog, node, prod, cons) or _act_matmul(prog, node, prod, cons)


def _act_why(prog, d) -> str:
    dt = prog.t(d.inputs[0]).dtype
    if dt not in QTYPES:
        return f"a {dt} operand (int8 and uint8 supported)"
    return f"{d.name!r} has scales or zero points per channel (per tensor only)"


def _act_stays_float(prog, node, why: str) -> bool:
    return _stays_float(prog, node, why, "DequantizeLinear x DequantizeLinear")


def _act_matmul(prog, node, prod, cons):
    """``DQ(a), DQ(b) -> MatMul [-> Relu | Clip] -> Q`` is ``QMatMul_i8`` (QLinearMatMul);
    without the Q, ``QMatMulFloat_i8`` (MatMulIntegerToFloat)."""
    ds = [prod.get(i) for i in node.inputs[:2]]
    if any(d is None or d.op != "DequantizeLinear" for d in ds):
        return False
    srcs = [_src(prog, prod, i) for i in node.inputs[:2]]
    for d, s in zip(ds, srcs):
        if s is None:
            return _act_stays_float(prog, node, _act_why(prog, d))
    (aq, sa, za, adt), (bq, sb, zb, bdt) = srcs
    a_shape, b_shape = prog.t(aq).shape, prog.t(bq).shape
    y_shape = prog.t(node.outputs[0]).shape
    at, bt = QTYPES[adt][0], QTYPES[bdt][0]
    if len(a_shape) < 2 or len(b_shape) < 2:
        return _act_stays_float(prog, node, "a 1-d operand (rank 2 or more supported)")
    if not overflow_free(at, bt, za, zb, int(a_shape[-1])):
        return _act_stays_float(prog, node, "int32 accumulation could overflow")
    sink = _sink(prog, cons, node.outputs[0])
    a, b = (sa, za, at), (sb, zb, bt)
    if sink is None:  # float output: MatMulIntegerToFloat
        extra = _qmm_fields(a_shape, b_shape, y_shape, a, b, None)
        new = Node("QMatMulFloat_i8", node.name, [aq, bq], [node.outputs[0]], {}, node.opset, extra)
        _replace(prog, node, new, [])
        return True
    removed, yq, sy, zy, ydt, lo, hi = sink
    qmin, qmax = _clamp(sy, zy, ydt, lo, hi)
    extra = _qmm_fields(a_shape, b_shape, y_shape, a, b, (sy, zy, QTYPES[ydt][0]), qmin, qmax)
    extra["fused"] = _fused(removed)
    new = Node("QMatMul_i8", node.name, [aq, bq], [yq], {}, node.opset, extra)
    _replace(prog, node, new, removed)
    return True


_RULES = {
    "Conv": _conv,
    "Gemm": _fc,
    "MatMul": _matmul,
    "Add": _add,
    "AveragePool": _avg,
    "GlobalAveragePool": _avg,
    "ReduceMean": _avg,
}
