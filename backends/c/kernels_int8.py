"""QuantizeLinear / DequantizeLinear and the integer kernels that QDQ groups lower to.

A QDQ model (ORT ``quantize_static``, graphopt's ``qdq`` pass) computes in float between
``DequantizeLinear`` and ``QuantizeLinear`` nodes. ``qdq_lower.lower_qdq`` rewrites these
groups, after weights were folded (a folded weight keeps its int8 form in ``Tensor.qinfo``):

- ``DQ(x) -> Conv | Gemm | MatMul(const B) [-> Relu | Clip] -> Q``: int8 (or int16 when a
  weight zero point is not 0) weights, int32 bias ``round(b / (sx * sw))``, int32
  accumulation, per-channel requantisation by ``sx * sw[c] / sy`` as a fixed-point multiplier
  and shift, the activation folded into the output clamp;
- ``DQ(x) -> Conv | Gemm | MatMul(const B)`` with no Q after it (a classifier's last layer):
  the same integer weights and int32 accumulation, then ``float(acc) * fl32(sx * sw[c])`` plus
  a float bias if the bias is not int32 (ORT's QGemm with float output), ``QFcFloat_i8`` /
  ``QConvFloat_i8``;
- ``DQ(a), DQ(b) -> MatMul [-> Relu | Clip] -> Q`` (two activations, attention's ``p v``):
  ``QMatMul_i8``, ORT's QLinearMatMul; without the Q (``q kᵀ``) ``QMatMulFloat_i8``, ORT's
  MatMulIntegerToFloat (:mod:`.matmul_q8`);
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

from . import conv_dw, conv_fast, conv_q8, csrc_float, csrc_int8, sparse
from .ctext import c_float
from .ir import FLOAT, Node, Tensor, Unsupported
from .kernels_pool import window_arrays
from .opbase import FAST, ConvGeometry, Op, need, norm_axis, opt

QTYPES = {np.dtype(np.int8): ("int8_t", -128, 127), np.dtype(np.uint8): ("uint8_t", 0, 255)}
# QuantizeLinear / DequantizeLinear also take 16-bit integers (their groups stay float)
QDQ_TYPES = {
    **QTYPES,
    np.dtype(np.int16): ("int16_t", -32768, 32767),
    np.dtype(np.uint16): ("uint16_t", 0, 65535),
}
_TAG = {"int8_t": "s8", "uint8_t": "u8", "int16_t": "s16", "float": "f32"}


def quantize_multiplier(m: float) -> tuple[int, int]:
    """``m ~= qm * 2^-(31 + qs)`` with ``qm`` in [2^30, 2^31) and ``31 + qs <= 62``; ``(0, 0)``
    for ``m == 0`` and for ``m < 2^-32``, which scales every int32 to 0."""
    if m <= 0:
        return 0, 0
    mant, exp = math.frexp(m)
    qm = int(round(mant * (1 << 31)))
    if qm == 1 << 31:
        qm //= 2
        exp += 1
    if exp > 30:
        raise Unsupported(f"requantisation multiplier {m:g} is too large")
    if 31 - exp > 62:
        return 0, 0
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


def _per_axis(node: Node, cg, x: Tensor, prefix: str, body) -> str:
    """Loops over ``x`` as ``[outer][axis][inner]`` running ``body(sv, zv)`` (C lines) on
    element ``j``, where ``sv``/``zv`` are its scale and zero point: literals, or the per-axis
    tables ``<prefix>_scale``/``<prefix>_zero_point`` indexed by ``c``."""
    s, z = node.extra["s"], node.extra["z"]
    if s.size == 1 or not x.shape:
        outer, mid, inner = 1, 1, x.size
    else:
        axis = node.extra["axis"]
        outer = int(np.prod(x.shape[:axis], dtype=np.int64))
        mid, inner = x.shape[axis], int(np.prod(x.shape[axis + 1 :], dtype=np.int64))
    ss = cg.weight(s, f"{prefix}_scale") if s.size > 1 else None
    zs = cg.weight(z.astype(np.int32), f"{prefix}_zero_point") if z.size > 1 else None
    sv = f"{ss}[c]" if ss else c_float(s[0])
    zv = f"{zs}[c]" if zs else str(int(z[0]))
    return (
        f"  long o, c, i;\n  for (o = 0; o < {outer}; ++o)\n"
        f"    for (c = 0; c < {mid}; ++c)\n      for (i = 0; i < {inner}; ++i) {{\n"
        f"        const long j = (o * {mid} + c) * {inner} + i;\n" + body(sv, zv) + "      }"
    )


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
        ct, lo, hi = QDQ_TYPES[y.dtype]

        def body(sv, zv):
            return (
                f"        const float v = rintf(x[j] / {sv}) + (float)({zv});\n"
                f"        y[j] = ({ct})(v < {lo}.f ? {lo} : (v > {hi}.f ? {hi} : (int)v));\n"
            )

        head = f"  const float *x = {cg.ptr(x.name)};\n  {ct} *y = {cg.ptr(y.name)};\n"
        return head + _per_axis(node, cg, x, "q", body)


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

        def body(sv, zv):
            return f"        y[j] = (float)((int64_t)x[j] - {zv}) * {sv};\n"

        head = f"  const {x.ctype} *x = {cg.ptr(x.name)};\n  float *y = {cg.ptr(y.name)};\n"
        return head + _per_axis(node, cg, x, "dq", body)


# -- integer kernels (created by lower_qdq only) ---------------------------------------------
def _qargs(cg, e) -> str:
    """The output-stage arguments (:func:`.csrc_int8.output_args`) of an integer kernel."""
    if e["yt"] == "float":
        sc = cg.weight(e["sc"], "dequant_scale")
        fb = cg.weight(e["fb"], "bias_float") if e.get("fb") is not None else "0"
        return f"{e['zx']}, {sc}, {fb}"
    qm = cg.weight(e["qm"], "requant_multiplier")
    qs = cg.weight(e["qs"], "requant_shift")
    return f"{e['zx']}, {qm}, {qs}, {e['zy']}, {e['qmin']}, {e['qmax']}"


def _helpers(cg, requant: bool = True, yt: str = "int8_t") -> None:
    """The helpers of an integer kernel; ``requant``: it calls the output stage for ``yt``
    (``gp_requant_clamp``, or ``gp_dequant_acc`` for a float output)."""
    cg.helper("div", csrc_float.DIV)
    cg.helper("nounroll", conv_fast.NOUNROLL)
    if requant:  # a static function no kernel calls would trip -Wunused-function
        cg.helper(*csrc_int8.output_helper(yt))


def _kernel(cg, e, kind: str, template: str) -> str:
    """Emit ``template`` (a :mod:`.csrc_int8` kernel) specialised to the node's C types
    (``xt``, ``wt`` when it has weights, ``yt``) once; returns its name ``gp_<kind>_<tag>``."""
    _helpers(cg, True, e["yt"])
    tag = "".join(_TAG[e[k]] for k in ("xt", "wt", "yt") if k in e)
    code = csrc_int8.specialise(template, tag, e["xt"], e["yt"], e.get("wt", "int8_t"))
    cg.helper(f"{kind}_{tag}", code)
    return f"gp_{kind}_{tag}"


class QConv(Op):
    inplace = (0,)  # the depthwise kernel only: conv_dw.may_overwrite

    def inplace_ok(self, node, k, cg_tensors):
        return conv_dw.may_overwrite(node, k, cg_tensors)

    def prepare(self, node, tensors, sparse_ok):
        """``QConv_i8`` requantises to int8/uint8; ``QConvFloat_i8`` (no QuantizeLinear after
        the conv) scales to float by ``sx * sw[m]``, in the generic or the sparse kernel."""
        e = node.extra
        if (sparse_ok and sparse.best(e["w"]) is not None) or e["yt"] == "float":
            return
        geo = e["geo"]
        # both sum small integers in float (exact: csrc_int8.f32_exact)
        if "depthwise" in FAST and conv_dw.applicable(geo) and csrc_int8.f32_exact(e["w"]):
            e.update(kernel="depthwise", scratch=conv_dw.scratch_bytes(geo, True, e["qs"]))
        elif "int8-gemm" in FAST and conv_q8.applicable(geo, e["w"], e["bias"]):
            e.update(kernel="int8-gemm", scratch=conv_q8.scratch_bytes(geo, e))

    def emit(self, node, cg):
        e = node.extra
        geo: ConvGeometry = e["geo"]
        kernel = e.get("kernel")
        # the depthwise and GEMM int8 kernels requantise rows (gp_requant_row)
        _helpers(cg, kernel not in ("depthwise", "int8-gemm"), e["yt"])
        xt, yt, wt = e["xt"], e["yt"], e["wt"]
        q = _qargs(cg, e)
        x, y = cg.ptr(node.inputs[0]), cg.ptr(node.outputs[0])
        ptrs = f"  const {xt} *x = {x};\n  {yt} *y = {y};\n"
        bias = cg.weight(e["bias"], "conv_bias_int32") if e["bias"] is not None else "0"
        if kernel == "depthwise":
            return ptrs + conv_dw.emit_int8(cg, geo, e, bias, q)
        if kernel == "int8-gemm":
            return ptrs + conv_q8.emit(cg, geo, e, bias, q)
        code = sparse.emit_conv(cg, node, geo, e["w"], "x", "y", bias, q, (xt, wt, yt))
        if code is not None:
            return ptrs + code
        fn = _kernel(cg, e, "qconv", csrc_int8.QCONV)
        w = cg.weight(e["w"].reshape(-1), "qconv_w")
        args = geo.args()
        return (
            ptrs + f"  int n;\n  for (n = 0; n < {geo.N}; ++n)\n"
            f"    {fn}(x + (long)n * {geo.x_size}, {w}, {bias}, y + (long)n * {geo.y_size}, "
            f"{args}, {q});"
        )


class QFc(Op):
    """``y[rows][N] = x[rows][K] W^T``: int32 accumulation of ``(x - zx) * w`` (plus an int32
    bias), requantised to int8/uint8 (``QFc_i8``) or, when the result stays float
    (``QFcFloat_i8``: ORT's QGemm with float output), ``float(acc) * (sx * sw[n])`` plus a
    float bias if there is one (:func:`.csrc_int8.output_stage`). The weights stay integers
    in every kernel: dense (``gp_q8fc``, or the generic ``gp_qfc``) or sparse."""

    def prepare(self, node, tensors, sparse_ok):
        e = node.extra
        if sparse_ok and sparse.best(e["w"]) is not None:
            return
        if "int8-gemm" in FAST and conv_q8.fits_int32(e["w"], e["bias"]):
            n, k = e["w"].shape
            e.update(kernel="int8-gemm", scratch=conv_q8.fc_scratch_bytes(n, k, e["rows"]))

    def emit(self, node, cg):
        e = node.extra
        _helpers(cg, True, e["yt"])
        xt, yt, wt = e["xt"], e["yt"], e["wt"]
        w = e["w"]  # [N][K]
        bias = cg.weight(e["bias"], "fc_bias_int32") if e["bias"] is not None else "0"
        x, y = cg.ptr(node.inputs[0]), cg.ptr(node.outputs[0])
        q = _qargs(cg, e)
        if e.get("kernel") == "int8-gemm":
            return conv_q8.emit_fc(cg, e, x, y, bias, q)
        code = sparse.emit_fc(cg, node, w, e["rows"], x, y, bias, q, (xt, wt, yt))
        if code is not None:
            return code
        fn = _kernel(cg, e, "qfc", csrc_int8.QFC)
        n, k = w.shape
        nb = -(-n // 32)
        wp = np.zeros((nb * 32, k), w.dtype)
        wp[:n] = w
        wp = np.ascontiguousarray(wp.reshape(nb, 32, k).transpose(0, 2, 1))
        wsym = cg.weight(wp.reshape(-1), "qfc_w_packed_32")
        return f"  {fn}({x}, {wsym}, {bias}, {y}, {e['rows']}, {n}, {k}, {q});"


class QAdd(Op):
    def emit(self, node, cg):
        e = node.extra
        fn = _kernel(cg, e, "qadd", csrc_int8.QADD)
        return (
            f"  {fn}({cg.ptr(node.inputs[0])}, {cg.ptr(node.inputs[1])}, "
            f"{cg.ptr(node.outputs[0])}, {cg.t(node.outputs[0]).size}, {e['za']}, {e['zb']}, "
            f"{e['ma']}, {e['sa']}, {e['mb']}, {e['sb']}, {e['mo']}, {e['so']}, {e['zy']}, "
            f"{e['qmin']}, {e['qmax']});"
        )


class QAvgPool(Op):
    def emit(self, node, cg):
        e = node.extra
        fn = _kernel(cg, e, "qavg", csrc_int8.QAVG)
        x = cg.t(node.inputs[0])
        return window_arrays(x.shape, e["p"]) + (
            f"  {fn}({cg.ptr(x.name)}, {cg.ptr(node.outputs[0])}, "
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
    "QFcFloat_i8": QFc(),
    "QConvFloat_i8": QConv(),
    "QAdd_i8": QAdd(),
    "QAvgPool_i8": QAvgPool(),
}
