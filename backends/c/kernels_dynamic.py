"""Dynamic int8 quantization, as graphopt's ``qdq(activations=dynamic)`` and ONNX Runtime's
``quantize_dynamic`` export a Linear: ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul
[-> Add]``. The float Cast/Mul/Add are ordinary kernels; the two integer ops are here.

- ``DynamicQuantizeLinear``: per-tensor uint8 with the scale and zero point of the input's
  range, rounding half to even and saturating as the ONNX spec says (when the range is empty,
  scale 1 as ONNX Runtime does: ``x`` is then all zeros, so the values are the same).
- ``MatMulInteger``: ``y = sum_k (a - a_zero_point) (b - b_zero_point)`` accumulated in
  int32, numpy-broadcast batch dimensions as MatMul; ``a_zero_point`` per tensor,
  ``b_zero_point`` per tensor or per column of a 2-d ``B``."""

from __future__ import annotations

import numpy as np

from . import csrc_transformer
from .ctext import broadcast_strides, index_expr, loop_nest, strides_of
from .ir import FLOAT, Unsupported
from .opbase import Op, broadcast_shape, need, opt

U8, I8 = np.dtype(np.uint8), np.dtype(np.int8)
_TAG = {U8: "u8", I8: "s8"}
# the largest depth whose int32 sums cannot overflow: K * 255 * 255 < 2^31
MAX_K = (2**31 - 1) // (255 * 255)


class DynamicQuantizeLinear(Op):
    """``x`` (float32) -> ``y`` (uint8), ``y_scale`` (float32 scalar), ``y_zero_point``
    (uint8 scalar); see the module docstring."""

    def infer(self, node, ins):
        x = need(ins, 0, "x")
        if x.dtype != FLOAT:
            raise Unsupported(f"dtype {x.dtype} (float32 only)")
        if not node.outputs or not node.outputs[0]:
            raise Unsupported("no y output")
        return [(x.shape, U8), ((), FLOAT), ((), U8)][: len(node.outputs)]

    def emit(self, node, cg):
        outs = (node.outputs + ["", "", ""])[:3]
        ps = cg.ptr(outs[1]) if outs[1] else "(float *)0"
        pz = cg.ptr(outs[2]) if outs[2] else "(uint8_t *)0"
        y = cg.ptr(outs[0])
        cg.helper("dynq_u8", csrc_transformer.DYNAMIC_QUANTIZE)
        n = cg.t(node.inputs[0]).size
        return f"  gp_dynq_u8({cg.ptr(node.inputs[0])}, {y}, {ps}, {pz}, {n});"


class MatMulInteger(Op):
    """``A [..., M, K]`` x ``B [..., K, N]`` -> int32 ``[..., M, N]`` (uint8 or int8 each);
    see the module docstring."""

    def infer(self, node, ins):
        a, b = need(ins, 0, "A"), need(ins, 1, "B")
        za, zb = opt(ins, 2), opt(ins, 3)
        for t, what in ((a, "A"), (b, "B")):
            if t.dtype not in _TAG:
                raise Unsupported(f"{what} dtype {t.dtype} (uint8 and int8 are supported)")
        for t, x, what in ((za, a, "a_zero_point"), (zb, b, "b_zero_point")):
            if t is not None and t.dtype != x.dtype:
                raise Unsupported(f"{what} dtype {t.dtype} differs from its matrix's")
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise Unsupported("1-d operands (A and B must have rank 2 or more)")
        M, K = a.shape[-2:]
        K2, N = b.shape[-2:]
        if K != K2:
            raise Unsupported(f"inner dimensions of {a.shape} and {b.shape} differ")
        if K > MAX_K:
            raise Unsupported(f"depth {K} > {MAX_K} could overflow the int32 accumulator")
        if za is not None and za.size != 1:
            raise Unsupported(f"a_zero_point of shape {za.shape} (only per tensor)")
        if zb is not None and zb.size != 1 and (len(b.shape) != 2 or zb.size != N):
            raise Unsupported(f"b_zero_point of shape {zb.shape} (per tensor or per column)")
        batch = broadcast_shape(a.shape[:-2], b.shape[:-2])
        node.extra.update(M=M, K=K, N=N, batch=batch)
        return [((*batch, M, N), np.dtype(np.int32))]

    def emit(self, node, cg):
        e = node.extra
        M, K, N, batch = e["M"], e["K"], e["N"], e["batch"]
        a, b = cg.t(node.inputs[0]), cg.t(node.inputs[1])
        if not M * N * int(np.prod(batch, dtype=np.int64)):
            return "  /* empty */"
        names = node.inputs + ["", ""]
        za = f"(int32_t)*{cg.ptr(names[2])}" if names[2] else "0"
        zb, zbs = (cg.ptr(names[3]), int(cg.t(names[3]).size != 1)) if names[3] else ("0", 0)
        tag = _TAG[a.dtype] + _TAG[b.dtype]
        code = (
            csrc_transformer.MATMUL_INTEGER.replace("@TAG@", tag)
            .replace("@TA@", a.ctype)
            .replace("@TB@", b.ctype)
        )
        cg.helper(f"mmi_{tag}", code)
        ab = [s * M * K for s in broadcast_strides(a.shape[:-2], batch)] if batch else []
        bb = [s * K * N for s in broadcast_strides(b.shape[:-2], batch)] if batch else []
        ys = [s * M * N for s in strides_of(batch)]
        call = (
            f"gp_mmi_{tag}(a + {index_expr('i', ab)}, b + {index_expr('i', bb)}, "
            f"y + {index_expr('i', ys)}, {M}, {N}, {K}, za, zb, {zbs});"
        )
        return (
            f"  const {a.ctype} *a = {cg.ptr(a.name)};\n"
            f"  const {b.ctype} *b = {cg.ptr(b.name)};\n"
            f"  int32_t *y = {cg.ptr(node.outputs[0])};\n"
            f"  const int32_t za = {za};\n"
            f"  const {b.ctype} *zb = {zb};\n" + (loop_nest(batch, call) if batch else "  " + call)
        )


DYNAMIC_OPS: dict[str, Op] = {
    "DynamicQuantizeLinear": DynamicQuantizeLinear(),
    "MatMulInteger": MatMulInteger(),
}
