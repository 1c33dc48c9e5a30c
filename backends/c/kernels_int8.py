"""QuantizeLinear / DequantizeLinear and the integer kernels that QDQ groups lower to.

A QDQ model (ORT ``quantize_static``, graphopt's ``qdq`` pass) computes in float between
``DequantizeLinear`` and ``QuantizeLinear`` nodes. ``qdq_lower.lower_qdq`` rewrites these
groups, after weights were folded (a folded weight keeps its int8 form in ``Tensor.qinfo``):

- ``DQ(x) -> Conv | Gemm | MatMul(const B) [-> Relu | Clip] -> Q``: int8 (or int16 when a
  weight zero point is not 0) weights, int32 bias ``round(b / (sx * sw))``, int32
  accumulation, per-channel requantisation by ``sx * sw[c] / sy`` as a fixed-point multiplier
  and shift, the activation folded into the output clamp;
- ``DQ(a), DQ(b) -> Add [-> Relu] -> Q`` (same shapes): TFLite's integer add;
- ``DQ(x) -> AveragePool | GlobalAveragePool -> Q``: integer window sums, requantised by
  ``sx / (sy * count)``;
- ``DQ(x) -> MaxPool | Reshape | Flatten | Squeeze | Unsqueeze | Transpose | Identity | Slice |
  Concat -> Q`` with one scale and zero point throughout: the op runs on the integers as is.

What matches none of these keeps the float path (DQ and Q are kernels too), so every QDQ model
the float ops cover compiles; the report's op counts show what was lowered.
"""

from __future__ import annotations

import math

import numpy as np

from . import conv_fast, csrc_float, csrc_int8, sparse
from .cgen import c_float
from .ir import FLOAT, Node, Tensor, Unsupported
from .opbase import Op, need, norm_axis, opt

QTYPES = {np.dtype(np.int8): ("int8_t", -128, 127), np.dtype(np.uint8): ("uint8_t", 0, 255)}
# QuantizeLinear / DequantizeLinear also take 16-bit integers (their groups stay float)
QDQ_TYPES = {
    **QTYPES,
    np.dtype(np.int16): ("int16_t", -32768, 32767),
    np.dtype(np.uint16): ("uint16_t", 0, 65535),
}
_TAG = {"int8_t": "s8", "uint8_t": "u8", "int16_t": "s16"}


def quantize_multiplier(m: float) -> tuple[int, int]:
    """``m ~= qm * 2^-(31 + qs)`` with ``qm`` in [2^30, 2^31) (``(0, 0)`` for ``m == 0``)."""
    if m <= 0:
        return 0, 0
    mant, exp = math.frexp(m)
    qm = int(round(mant * (1 << 31)))
    if qm == 1 << 31:
        qm //= 2
        exp += 1
    if exp > 30:
        raise Unsupported(f"requantisation multiplier {m:g} is too large")
    return qm, -exp


def _multipliers(ms) -> tuple[np.ndarray, np.ndarray]:
    pairs = [quantize_multiplier(float(m)) for m in np.asarray(ms, np.float64).reshape(-1)]
    return (np.array([p[0] for p in pairs], np.int32), np.array([p[1] for p in pairs], np.int32))


# -- QuantizeLinear / DequantizeLinear as float kernels --------------------------------------
def _qparams(node: Node, ins, x: Tensor, zp_default: np.dtype):
    scale = need(ins, 1, "scale")
    zp = opt(ins, 2)
    if scale.value is None or (zp is not None and zp.value is None):
        raise Unsupported("scale and zero point must be constants")
    if node.attr("block_size"):
        raise Unsupported("blocked quantization")
    s = np.asarray(scale.value, np.float32).reshape(-1)
    z = (np.zeros(1, zp_default) if zp is None else np.asarray(zp.value)).reshape(-1)
    per_axis = s.size > 1 or z.size > 1
    axis = norm_axis(int(node.attr("axis", 1)), len(x.shape), node) if per_axis else 0
    if s.size > 1 and (not x.shape or s.size != x.shape[axis]):
        raise Unsupported(f"{s.size} scales for axis {axis} of shape {x.shape}")
    if z.size not in (1, s.size):
        raise Unsupported("zero point and scale sizes differ")
    return s, z, axis


def _per_axis_loop(x: Tensor, axis: int, n_params: int) -> tuple[int, int, int]:
    if n_params == 1 or not x.shape:
        return 1, 1, x.size
    outer = int(np.prod(x.shape[:axis], dtype=np.int64))
    return outer, x.shape[axis], int(np.prod(x.shape[axis + 1 :], dtype=np.int64))


class QuantizeLinear(Op):
    def infer(self, node, ins):
        x = need(ins, 0, "x")
        if x.dtype != FLOAT:
            raise Unsupported(f"input dtype {x.dtype}")
        s, z, axis = _qparams(node, ins, x, np.dtype(np.uint8))
        if z.dtype not in QDQ_TYPES:
            raise Unsupported(f"output dtype {z.dtype} (int8, uint8, int16, uint16 supported)")
        node.extra.update(s=s, z=z, axis=axis)
        return [(x.shape, z.dtype)]

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        s, z = node.extra["s"], node.extra["z"]
        ct, lo, hi = QDQ_TYPES[y.dtype]
        outer, mid, inner = _per_axis_loop(x, node.extra["axis"], s.size)
        ss = cg.weight(s, "q_scale") if s.size > 1 else None
        zs = cg.weight(z.astype(np.int32), "q_zero_point") if z.size > 1 else None
        sv = f"{ss}[c]" if ss else c_float(s[0])
        zv = f"{zs}[c]" if zs else str(int(z[0]))
        return (
            f"  const float *x = {cg.ptr(x.name)};\n  {ct} *y = {cg.ptr(y.name)};\n"
            f"  long o, c, i;\n  for (o = 0; o < {outer}; ++o)\n"
            f"    for (c = 0; c < {mid}; ++c)\n      for (i = 0; i < {inner}; ++i) {{\n"
            f"        const long j = (o * {mid} + c) * {inner} + i;\n"
            f"        const float v = rintf(x[j] / {sv}) + (float)({zv});\n"
            f"        y[j] = ({ct})(v < {lo}.f ? {lo} : (v > {hi}.f ? {hi} : (int)v));\n"
            "      }"
        )


class DequantizeLinear(Op):
    def infer(self, node, ins):
        x = need(ins, 0, "x")
        if x.dtype not in (*QDQ_TYPES, np.dtype(np.int32)):
            raise Unsupported(f"input dtype {x.dtype}")
        s, z, axis = _qparams(node, ins, x, x.dtype)
        node.extra.update(s=s, z=z, axis=axis)
        return [(x.shape, FLOAT)]

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        s, z = node.extra["s"], node.extra["z"]
        outer, mid, inner = _per_axis_loop(x, node.extra["axis"], s.size)
        ss = cg.weight(s, "dq_scale") if s.size > 1 else None
        zs = cg.weight(z.astype(np.int32), "dq_zero_point") if z.size > 1 else None
        sv = f"{ss}[c]" if ss else c_float(s[0])
        zv = f"{zs}[c]" if zs else str(int(z[0]))
        return (
            f"  const {x.ctype} *x = {cg.ptr(x.name)};\n  float *y = {cg.ptr(y.name)};\n"
            f"  long o, c, i;\n  for (o = 0; o < {outer}; ++o)\n"
            f"    for (c = 0; c < {mid}; ++c)\n      for (i = 0; i < {inner}; ++i) {{\n"
            f"        const long j = (o * {mid} + c) * {inner} + i;\n"
            f"        y[j] = (float)((int64_t)x[j] - {zv}) * {sv};\n"
            "      }"
        )


# -- integer kernels (created by lower_qdq only) ---------------------------------------------
def _qargs(cg, e) -> str:
    qm = cg.weight(e["qm"], "requant_multiplier")
    qs = cg.weight(e["qs"], "requant_shift")
    return f"{e['zx']}, {qm}, {qs}, {e['zy']}, {e['qmin']}, {e['qmax']}"


def _helpers(cg) -> None:
    cg.helper("div", csrc_float.DIV)
    cg.helper("nounroll", conv_fast.NOUNROLL)
    cg.helper("requant", csrc_int8.REQUANT)


class QConv(Op):
    def emit(self, node, cg):
        e = node.extra
        _helpers(cg)
        geo = e["geo"]
        xt, yt, wt = e["xt"], e["yt"], e["wt"]
        bias = cg.weight(e["bias"], "conv_bias_int32") if e["bias"] is not None else "0"
        xs = geo["C"] * geo["H"] * geo["W"]
        ys = geo["M"] * geo["OH"] * geo["OW"]
        args = ", ".join(
            str(geo[k])
            for k in (
                "C",
                "H",
                "W",
                "M",
                "OH",
                "OW",
                "KH",
                "KW",
                "sh",
                "sw",
                "dh",
                "dw",
                "ph",
                "pw",
                "G",
            )
        )
        tag = _TAG[xt] + _TAG[wt] + _TAG[yt]
        q = _qargs(cg, e)
        head = (
            f"  const {xt} *x = {cg.ptr(node.inputs[0])};\n"
            f"  {yt} *y = {cg.ptr(node.outputs[0])};\n  int n;\n"
            f"  for (n = 0; n < {e['n']}; ++n)\n"
        )
        code = sparse.emit_conv(cg, node, geo, e["w"], e["n"], "x", "y", bias, q, (xt, wt, yt))
        if code is not None:
            return (
                f"  const {xt} *x = {cg.ptr(node.inputs[0])};\n"
                f"  {yt} *y = {cg.ptr(node.outputs[0])};\n{code}"
            )
        if conv_fast.pointwise(geo):
            cg.helper(f"qpw_{tag}", csrc_int8.specialise(csrc_int8.QPW, tag, xt, yt, wt))
            w = cg.weight(conv_fast.pack(e["w"], 1, 4, e["w"].dtype).reshape(-1), "qpw_w_packed_4")
            return (
                head + f"    gp_qpw_{tag}(x + (long)n * {xs}, {w}, {bias}, "
                f"y + (long)n * {ys}, {geo['C']}, {geo['M']}, {geo['H'] * geo['W']}, {q});"
            )
        if geo["G"] == geo["C"] == geo["M"]:
            cg.helper(f"qdw_{tag}", csrc_int8.specialise(csrc_int8.QDW, tag, xt, yt, wt))
            w = cg.weight(e["w"].reshape(-1), "qdw_w")
            dargs = ", ".join(
                str(geo[k])
                for k in ("C", "H", "W", "OH", "OW", "KH", "KW", "sh", "sw", "dh", "dw", "ph", "pw")
            )
            return (
                head + f"    gp_qdw_{tag}(x + (long)n * {xs}, {w}, {bias}, "
                f"y + (long)n * {ys}, {dargs}, {q});"
            )
        if conv_fast.applicable(geo):
            mb = conv_fast.block_size(geo["M"] // geo["G"])
            fn, src = conv_fast.convp_source(mb, {"xt": xt, "yt": yt, "wt": wt})
            cg.helper(fn, src)
            w = cg.weight(
                conv_fast.pack(e["w"], geo["G"], mb, e["w"].dtype).reshape(-1),
                f"qconv_w_packed_{mb}",
            )
        else:
            fn = f"gp_qconv_{tag}"
            cg.helper(fn, csrc_int8.specialise(csrc_int8.QCONV, tag, xt, yt, wt))
            w = cg.weight(e["w"].reshape(-1), "qconv_w")
        return head + f"    {fn}(x + (long)n * {xs}, {w}, {bias}, y + (long)n * {ys}, {args}, {q});"


class QFc(Op):
    def emit(self, node, cg):
        e = node.extra
        _helpers(cg)
        xt, yt, wt = e["xt"], e["yt"], e["wt"]
        tag = _TAG[xt] + _TAG[wt] + _TAG[yt]
        w = e["w"]  # [N][K]
        bias = cg.weight(e["bias"], "fc_bias_int32") if e["bias"] is not None else "0"
        x, y = cg.ptr(node.inputs[0]), cg.ptr(node.outputs[0])
        q = _qargs(cg, e)
        code = sparse.emit_fc(cg, node, w, e["rows"], x, y, bias, q, (xt, wt, yt))
        if code is not None:
            return code
        cg.helper(f"qfc_{tag}", csrc_int8.specialise(csrc_int8.QFC, tag, xt, yt, wt))
        n, k = w.shape
        nb = -(-n // 32)
        wp = np.zeros((nb * 32, k), w.dtype)
        wp[:n] = w
        wp = np.ascontiguousarray(wp.reshape(nb, 32, k).transpose(0, 2, 1))
        wsym = cg.weight(wp.reshape(-1), "qfc_w_packed_32")
        return (
            f"  gp_qfc_{tag}({cg.ptr(node.inputs[0])}, {wsym}, {bias}, "
            f"{cg.ptr(node.outputs[0])}, {e['rows']}, {n}, {k}, {q});"
        )


class QAdd(Op):
    def emit(self, node, cg):
        e = node.extra
        _helpers(cg)
        xt, yt = e["xt"], e["yt"]
        tag = _TAG[xt] + _TAG[yt]
        cg.helper(f"qadd_{tag}", csrc_int8.specialise(csrc_int8.QADD, tag, xt, yt))
        return (
            f"  gp_qadd_{tag}({cg.ptr(node.inputs[0])}, {cg.ptr(node.inputs[1])}, "
            f"{cg.ptr(node.outputs[0])}, {cg.t(node.outputs[0]).size}, {e['za']}, {e['zb']}, "
            f"{e['ma']}, {e['sa']}, {e['mb']}, {e['sb']}, {e['mo']}, {e['so']}, {e['zy']}, "
            f"{e['qmin']}, {e['qmax']});"
        )


class QAvgPool(Op):
    def emit(self, node, cg):
        e = node.extra
        _helpers(cg)
        xt, yt = e["xt"], e["yt"]
        tag = _TAG[xt] + _TAG[yt]
        cg.helper(f"qavg_{tag}", csrc_int8.specialise(csrc_int8.QAVG, tag, xt, yt))
        x = cg.t(node.inputs[0])

        def three(v, fill):
            return "{" + ", ".join(str(int(a)) for a in [fill] * (3 - len(v)) + list(v)) + "}"

        p = e["p"]
        return (
            f"  static const int in_[3] = {three(x.shape[2:], 1)}, out_[3] = "
            f"{three(p['out'], 1)}, k_[3] = {three(p['kernel'], 1)};\n"
            f"  static const int s_[3] = {three(p['strides'], 1)}, d_[3] = "
            f"{three(p['dilations'], 1)}, pb_[3] = {three(p['pb'], 0)}, "
            f"pe_[3] = {three(p['pe'], 0)};\n"
            f"  gp_qavg_{tag}({cg.ptr(x.name)}, {cg.ptr(node.outputs[0])}, "
            f"{x.shape[0] * x.shape[1]}, in_, out_, k_, s_, d_, pb_, pe_, "
            f"{e['include_pad']}, {_qargs(cg, e)});"
        )


class QRequant(Op):
    """``y = clamp(zy + (x - zx) * sx / sy)``: one integer tensor to another scale."""

    def emit(self, node, cg):
        e = node.extra
        _helpers(cg)
        return (
            f"  const {e['xt']} *x = {cg.ptr(node.inputs[0])};\n"
            f"  {e['xt']} *y = {cg.ptr(node.outputs[0])};\n  long i;\n"
            f"  for (i = 0; i < {cg.t(node.outputs[0]).size}; ++i)\n"
            f"    y[i] = ({e['xt']})gp_requant_clamp((int32_t)x[i] - {e['zx']}, {e['qm']}, "
            f"{e['qs']}, {e['zy']}, {e['qmin']}, {e['qmax']});"
        )


INT8_OPS: dict[str, Op] = {
    "QRequant_i8": QRequant(),
    "QuantizeLinear": QuantizeLinear(),
    "DequantizeLinear": DequantizeLinear(),
    "QConv_i8": QConv(),
    "QFc_i8": QFc(),
    "QAdd_i8": QAdd(),
    "QAvgPool_i8": QAvgPool(),
}
