"""Integer products of two quantized activations (attention's ``q kᵀ`` and ``p v``).

``qdq_lower`` rewrites ``DequantizeLinear(a), DequantizeLinear(b) -> MatMul`` (neither operand
a constant: per-tensor scales and zero points, int8 or uint8 each) into one of:

- ``QMatMul_i8`` when one ``QuantizeLinear`` (optionally after a Relu or constant Clip,
  folded into the clamp) reads the product: ONNX ``QLinearMatMul``, computed as ONNX Runtime's
  kernel does::

      acc = sum_k (a[m, k] - za) * (b[k, n] - zb)           (int32, exact)
      v   = float(acc) * fl32(fl32(sa * sb) / sy)           (float32, one rounding each)
      y   = rint(clamp(v, qmin - zy, qmax - zy)) + zy        (round half to even, saturate)

  (MLAS ``MlasRequantizeOutput``: convert, multiply, clamp, ``cvtps2dq``; clamping to integer
  bounds before or after the rounding gives the same value). ``onnx.reference`` multiplies the
  same accumulator in float64, so it can differ by one step where ``acc * scale`` lies within a
  float32 rounding of a half;
- ``QMatMulFloat_i8`` when the product stays float (the scores in front of a float softmax):
  ``com.microsoft.MatMulIntegerToFloat``, ``y = float(acc) * fl32(sa * sb)`` (ORT's
  ``multiplier = a_scale * b_scale`` in float32, applied to the converted accumulator).

Batch dimensions broadcast as MatMul's do (rank 2 and above; 1-d operands stay float). The
int32 sum is exact when ``K * max|a - za| * max|b - zb| < 2^31``; a product that could
overflow stays on the float path (``qdq_lower`` notes why). ``qdq_lower`` builds the fields
with :func:`fields`; this module holds the C text and the op that emits it."""

from __future__ import annotations

import numpy as np

from .ctext import broadcast_strides, c_float, index_expr, loop_nest, strides_of
from .ir import Node
from .opbase import Op

_TAG = {"int8_t": "s8", "uint8_t": "u8", "float": "f32"}
_RANGE = {"int8_t": (-128, 127), "uint8_t": (0, 255)}
#: int32 accumulators per block of a row (on the stack: no arena scratch)
ROW_BLOCK = 256

# One matrix: y[m][n] = OUT(sum_k (a[m][k] - za) * (b[k][n] - zb)), the row's accumulators in
# blocks of ROW_BLOCK on the stack. @AT@/@BT@/@YT@: the C types; @OUT@ the output stage.
QMATMUL = r"""
static void gp_qmm_@TAG@(const @AT@ *a, const @BT@ *b, @YT@ *y, long M, long N, long K,
                        int32_t za, int32_t zb, float sc@QARGS@)
{
  int32_t acc[@BLOCK@];
  long m, n0, n, k;
  for (m = 0; m < M; ++m) {
    const @AT@ *ar = a + m * K;
    @YT@ *yr = y + m * N;
    for (n0 = 0; n0 < N; n0 += @BLOCK@) {
      const long nb = N - n0 < @BLOCK@ ? N - n0 : @BLOCK@;
      for (n = 0; n < nb; ++n) acc[n] = 0;
      for (k = 0; k < K; ++k) {
        const int32_t av = (int32_t)ar[k] - za;
        const @BT@ *br = b + k * N + n0;
        if (!av) continue;
        for (n = 0; n < nb; ++n) acc[n] += av * ((int32_t)br[n] - zb);
      }
      for (n = 0; n < nb; ++n) {
@OUT@
      }
    }
  }
}
"""

# float32 product of the converted accumulator and the scale, then (int8 output) clamp to the
# zero-point-shifted range, round half to even (the default rounding mode) and shift back
_OUT_FLOAT = "        yr[n0 + n] = (float)acc[n] * sc;"
_OUT_INT = (
    "        float v = (float)acc[n] * sc;\n"
    "        v = v > lo ? v : lo;\n"
    "        v = v < hi ? v : hi;\n"
    "        yr[n0 + n] = (@YT@)((int32_t)rintf(v) + zy);"
)
_QARGS_INT = ", int zy, float lo, float hi"


def overflow_free(at: str, bt: str, za: int, zb: int, k: int) -> bool:
    """Whether ``K`` products ``(a - za) * (b - zb)`` sum in int32 without overflow."""
    (alo, ahi), (blo, bhi) = _RANGE[at], _RANGE[bt]
    ma, mb = max(abs(alo - za), abs(ahi - za)), max(abs(blo - zb), abs(bhi - zb))
    return k * ma * mb <= 2**31 - 1


def fields(
    a_shape, b_shape, y_shape, a: tuple, b: tuple, sink: tuple | None, qmin=None, qmax=None
) -> dict:
    """``node.extra`` of a ``QMatMul_i8`` (``sink``: ``(scale, zero point, C type)`` of the
    QuantizeLinear after it, with the clamp ``qmin``/``qmax``) or ``QMatMulFloat_i8``
    (``sink`` None). ``a``/``b``: ``(scale, zero point, C type)`` of the operands."""
    (sa, za, at), (sb, zb, bt) = a, b
    batch = tuple(int(d) for d in y_shape[:-2])
    m, k = (int(d) for d in a_shape[-2:])
    n = int(b_shape[-1])
    sab = np.float32(sa) * np.float32(sb)  # ORT: a_scale * b_scale in float32
    e = dict(M=m, K=k, N=n, batch=batch, za=za, zb=zb, at=at, bt=bt, fused=None)
    e["ab"] = [s * m * k for s in broadcast_strides(a_shape[:-2], batch)] if batch else []
    e["bb"] = [s * k * n for s in broadcast_strides(b_shape[:-2], batch)] if batch else []
    if sink is None:
        e.update(yt="float", sc=sab)
        return e
    sy, zy, yt = sink
    e.update(yt=yt, sc=np.float32(sab / np.float32(sy)), zy=zy, qmin=qmin, qmax=qmax)
    return e


def c_source(at: str, bt: str, yt: str) -> tuple[str, str]:
    """(name, C text) of the kernel for these operand and output C types."""
    tag = _TAG[at] + _TAG[bt] + _TAG[yt]
    out = _OUT_FLOAT if yt == "float" else _OUT_INT
    code = (
        QMATMUL.replace("@OUT@", out)
        .replace("@QARGS@", "" if yt == "float" else _QARGS_INT)
        .replace("@TAG@", tag)
        .replace("@AT@", at)
        .replace("@BT@", bt)
        .replace("@YT@", yt)
        .replace("@BLOCK@", str(ROW_BLOCK))
    )
    return f"gp_qmm_{tag}", code


class QMatMul(Op):
    """``QMatMul_i8`` (int8/uint8 output) and ``QMatMulFloat_i8`` (float output): ``A [..., M,
    K]`` x ``B [..., K, N]``, both integer; see the module docstring."""

    def emit(self, node: Node, cg) -> str:
        e = node.extra
        M, K, N, batch = e["M"], e["K"], e["N"], e["batch"]
        if not M * N * int(np.prod(batch, dtype=np.int64)):
            return "  /* empty */"
        fn, code = c_source(e["at"], e["bt"], e["yt"])
        cg.helper(fn, code)
        q = ""
        if e["yt"] != "float":
            zy = e["zy"]
            q = f", {zy}, {c_float(e['qmin'] - zy)}, {c_float(e['qmax'] - zy)}"
        ys = [s * M * N for s in strides_of(batch)]
        call = (
            f"{fn}(a + {index_expr('i', e['ab'])}, b + {index_expr('i', e['bb'])}, "
            f"y + {index_expr('i', ys)}, {M}, {N}, {K}, {e['za']}, {e['zb']}, "
            f"{c_float(e['sc'])}{q});"
        )
        return (
            f"  const {e['at']} *a = {cg.ptr(node.inputs[0])};\n"
            f"  const {e['bt']} *b = {cg.ptr(node.inputs[1])};\n"
            f"  {e['yt']} *y = {cg.ptr(node.outputs[0])};\n"
            + (loop_nest(batch, call) if batch else "  " + call)
        )


QMATMUL_OPS: dict[str, Op] = {"QMatMul_i8": QMatMul(), "QMatMulFloat_i8": QMatMul()}
