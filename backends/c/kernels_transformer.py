"""The ops transformer encoders add to a CNN's: LayerNormalization, Gelu, Gather,
GatherElements and Expand. Element-wise maths, comparisons, Where and Cast are in
:mod:`.kernels_math`.

Indices read at run time are checked in the C code: a negative index counts from the end, an
index still out of range yields zeros (ONNX leaves it undefined; the C code never reads outside
a tensor). Constant indices out of range are refused when the model is compiled."""

from __future__ import annotations

import numpy as np

from . import csrc_transformer
from .ctext import broadcast_strides, c_float, index_expr, loop_nest, strided_copy, strides_of
from .ir import FLOAT, Unsupported
from .kernels_data import sattr
from .kernels_float import Unary
from .opbase import Op, broadcast_shape, const_ints, float_only, need, norm_axis, opt

INDEX_TYPES = {np.dtype(np.int64), np.dtype(np.int32)}


class LayerNorm(Op):
    """``LayerNormalization`` over the axes ``[axis, rank)`` of float32 ``X``:
    ``Y = (X - mean) / sqrt(var + epsilon) * Scale + B`` with the biased variance, computed in
    two passes with double accumulators; optional outputs ``Mean`` and ``InvStdDev`` (shape
    ``X.shape[:axis] + [1] * (rank - axis)``). ``Scale`` and ``B`` broadcast to
    ``X.shape[axis:]``: a constant of any such shape, or at run time one value or all of them."""

    inplace = (0,)

    def infer(self, node, ins):
        x, s, b = need(ins, 0, "X"), need(ins, 1, "Scale"), opt(ins, 2)
        float_only(node, x, s, b)
        r = len(x.shape)
        if r == 0:
            raise Unsupported("scalar input")
        axis = norm_axis(int(node.attr("axis", -1)), r, node)
        stash = int(node.attr("stash_type", 1))
        if stash != 1:
            raise Unsupported(f"stash_type={stash} (only 1: float32 statistics)")
        norm = tuple(x.shape[axis:])
        if 0 in norm:
            raise Unsupported(f"normalizing over the empty shape {norm}")
        for t in (s, b):
            if t is None:
                continue
            if len(t.shape) > len(norm) or broadcast_shape(t.shape, norm) != norm:
                raise Unsupported(
                    f"{t.name!r} of shape {t.shape} does not broadcast to the normalized "
                    f"shape {norm}"
                )
            if t.value is None and t.size not in (1, int(np.prod(norm, dtype=np.int64))):
                raise Unsupported(
                    f"{t.name!r} of shape {t.shape} is computed at run time and only partly "
                    f"covers the normalized shape {norm} (make it a constant)"
                )
        rows = int(np.prod(x.shape[:axis], dtype=np.int64))
        node.extra.update(rows=rows, n=int(np.prod(norm, dtype=np.int64)), norm=norm)
        stat = (*x.shape[:axis], *[1] * (r - axis))
        return [(x.shape, FLOAT), (stat, FLOAT), (stat, FLOAT)][: len(node.outputs)]

    def emit(self, node, cg):
        e = node.extra
        rows, n = e["rows"], e["n"]
        if not rows:
            return "  /* empty */"

        def param(k):
            """(pointer, stride) of Scale (k=1) or B (k=2)."""
            if k >= len(node.inputs) or not node.inputs[k]:
                return "(const float *)0", 0
            t = cg.t(node.inputs[k])
            if t.size == n or t.value is None:
                return cg.ptr(t.name), int(t.size != 1)
            full = np.broadcast_to(np.asarray(t.value, np.float32), e["norm"])
            return cg.weight(np.ascontiguousarray(full).reshape(-1), t.name), 1

        (sp, ss), (bp, bs) = param(1), param(2)
        outs = [cg.ptr(o) if o else "(float *)0" for o in (node.outputs + ["", ""])[:3]]
        cg.helper("layernorm", csrc_transformer.LAYERNORM)
        return (
            f"  gp_layernorm_f32({cg.ptr(node.inputs[0])}, {sp}, {ss}, {bp}, {bs}, {outs[0]}, "
            f"{outs[1]}, {outs[2]}, {rows}, {n}, {c_float(float(node.attr('epsilon', 1e-5)))});"
        )


class Gelu(Unary):
    """``Gelu`` (opset 20): ``approximate="none"``: ``y = x / 2 * (1 + erf(x / sqrt(2)))``;
    ``"tanh"``: ``y = x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))``."""

    def __init__(self):
        super().__init__(None)

    def check(self, node, ins):
        super().check(node, ins)
        mode = sattr(node, "approximate", "none")
        if mode not in ("none", "tanh"):
            raise Unsupported(f"approximate={mode!r}")

    def expr(self, node, ctype):
        if sattr(node, "approximate", "none") == "tanh":
            return "0.5f * v * (1.f + tanhf(0.797884561f * (v + 0.044715f * v * v * v)))"
        return "0.5f * v * (1.f + erff(v * 0.707106781f))"


def _index_input(node, ins, k: int, dim: int):
    """The indices input ``k``: checked dtype, and constant values in ``[-dim, dim)``."""
    ind = need(ins, k, "indices")
    if ind.dtype not in INDEX_TYPES:
        raise Unsupported(f"indices dtype {ind.dtype} (int32 and int64 are supported)")
    if ind.value is not None and ind.size:
        v = np.asarray(ind.value)
        if v.min() < -dim or v.max() >= dim:
            raise Unsupported(f"constant indices outside [-{dim}, {dim})")
    return ind


class Gather(Op):
    """``y[o, j, i] = x[o, k, i]`` with ``k = indices[j]`` (``+ dim`` when negative), for
    ``x`` viewed as ``outer x dim x inner`` around ``axis`` and ``j`` over all indices."""

    def infer(self, node, ins):
        x = need(ins, 0, "data")
        r = len(x.shape)
        if r == 0:
            raise Unsupported("scalar data")
        axis = norm_axis(int(node.attr("axis", 0)), r, node)
        ind = _index_input(node, ins, 1, x.shape[axis])
        node.extra.update(
            outer=int(np.prod(x.shape[:axis], dtype=np.int64)),
            dim=x.shape[axis],
            inner=int(np.prod(x.shape[axis + 1 :], dtype=np.int64)),
            count=ind.size,
        )
        return [((*x.shape[:axis], *ind.shape, *x.shape[axis + 1 :]), x.dtype)]

    def emit(self, node, cg):
        e = node.extra
        x, ind, y = (cg.t(n) for n in (node.inputs[0], node.inputs[1], node.outputs[0]))
        if not y.size:
            return "  /* empty */"
        outer, dim, inner, cnt = e["outer"], e["dim"], e["inner"], e["count"]
        return (
            f"  const {x.ctype} *x = {cg.ptr(x.name)};\n"
            f"  const {ind.ctype} *ix = {cg.ptr(ind.name)};\n"
            f"  {y.ctype} *y = {cg.ptr(y.name)};\n"
            "  long o, j;\n"
            f"  for (o = 0; o < {outer}; ++o)\n"
            f"    for (j = 0; j < {cnt}; ++j) {{\n"
            f"      const int64_t k = ix[j] < 0 ? (int64_t)ix[j] + {dim} : (int64_t)ix[j];\n"
            f"      {y.ctype} *dst = y + (o * {cnt} + j) * {inner};\n"
            f"      if (k < 0 || k >= {dim}) memset(dst, 0, {inner} * sizeof(*dst));\n"
            f"      else memcpy(dst, x + (o * {dim} + (long)k) * {inner}, "
            f"{inner} * sizeof(*dst));\n"
            "    }"
        )


class GatherElements(Op):
    """``y[..., j, ...] = x[..., indices[..., j, ...], ...]`` along ``axis``: the output has
    the indices' shape, which may be smaller than the data's on the other axes."""

    def infer(self, node, ins):
        x = need(ins, 0, "data")
        r = len(x.shape)
        if r == 0:
            raise Unsupported("scalar data")
        axis = norm_axis(int(node.attr("axis", 0)), r, node)
        ind = _index_input(node, ins, 1, x.shape[axis])
        if len(ind.shape) != r or any(ind.shape[d] > x.shape[d] for d in range(r) if d != axis):
            raise Unsupported(f"indices of shape {ind.shape} do not fit data of shape {x.shape}")
        node.extra["axis"] = axis
        return [(ind.shape, x.dtype)]

    def emit(self, node, cg):
        x, ind, y = (cg.t(n) for n in (node.inputs[0], node.inputs[1], node.outputs[0]))
        if not y.size:
            return "  /* empty */"
        axis = node.extra["axis"]
        xs = strides_of(x.shape)
        base = [0 if d == axis else s for d, s in enumerate(xs)]
        dim = x.shape[axis]
        lin = index_expr("i", strides_of(y.shape))
        body = (
            f"{{ const int64_t k = ix[{lin}] < 0 ? (int64_t)ix[{lin}] + {dim} : "
            f"(int64_t)ix[{lin}]; y[{lin}] = (k < 0 || k >= {dim}) ? ({y.ctype})0 : "
            f"x[{index_expr('i', base)} + (long)k * {xs[axis]}]; }}"
        )
        return (
            f"  const {x.ctype} *x = {cg.ptr(x.name)};\n"
            f"  const {ind.ctype} *ix = {cg.ptr(ind.name)};\n"
            f"  {y.ctype} *y = {cg.ptr(y.name)};\n" + loop_nest(y.shape, body)
        )


class Expand(Op):
    """``y = x`` broadcast (numpy rules, both ways) with the constant ``shape``."""

    def infer(self, node, ins):
        x = need(ins, 0, "input")
        shape = const_ints(ins, 1, "shape")
        if shape is None:
            raise Unsupported("missing shape input")
        return [(broadcast_shape(x.shape, shape), x.dtype)]

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        if not y.size:
            return "  /* empty */"
        return (
            f"  const {x.ctype} *x = {cg.ptr(x.name)};\n  {y.ctype} *y = {cg.ptr(y.name)};\n"
            + strided_copy(
                y.ctype, "y", "x", y.shape, strides_of(y.shape), broadcast_strides(x.shape, y.shape)
            )
        )


TRANSFORMER_OPS: dict[str, Op] = {
    "LayerNormalization": LayerNorm(),
    "Gelu": Gelu(),
    "Gather": Gather(),
    "GatherElements": GatherElements(),
    "Expand": Expand(),
}
