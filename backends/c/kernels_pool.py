"""Pooling, Softmax, ReduceMean (float32) and ReduceSum (MaxPool and ReduceSum also on
integers)."""

from __future__ import annotations

import numpy as np

from . import csrc_float
from .ctext import broadcast_strides, c_float, collapse, index_expr, loop_nest, strides_of
from .ir import FLOAT, Unsupported
from .kernels_float import NUMERIC
from .opbase import Op, const_ints, float_only, need, norm_axis, spatial_params


def window_arrays(x_shape, p: dict[str, list[int]]) -> str:
    """C declarations of a pooling window (``p`` from :func:`~.opbase.spatial_params` plus
    ``kernel``) as the 3-d arrays ``in_, out_, k_, s_, d_, pb_, pe_`` the N-d pooling kernels
    take: sizes, kernel, strides, dilations and pads; unused leading axes get size 1, pad 0."""

    def three(v, fill):
        return "{" + ", ".join(str(int(a)) for a in [fill] * (3 - len(v)) + list(v)) + "}"

    return (
        f"  static const int in_[3] = {three(x_shape[2:], 1)}, out_[3] = "
        f"{three(p['out'], 1)}, k_[3] = {three(p['kernel'], 1)};\n"
        f"  static const int s_[3] = {three(p['strides'], 1)}, d_[3] = "
        f"{three(p['dilations'], 1)}, pb_[3] = {three(p['pb'], 0)}, "
        f"pe_[3] = {three(p['pe'], 0)};\n"
    )


class Pool(Op):
    def __init__(self, kind: str):
        self.kind = kind  # "max" or "avg"

    def infer(self, node, ins):
        x = need(ins, 0, "X")
        if self.kind == "max" and x.dtype not in NUMERIC:
            raise Unsupported(f"dtype {x.dtype}")
        if self.kind == "avg":
            float_only(node, x)
        if len([o for o in node.outputs if o]) != 1:
            raise Unsupported("the Indices output")
        nd = len(x.shape) - 2
        if not 1 <= nd <= 3:
            raise Unsupported(f"{nd}-d pooling")
        kernel = list(node.attr("kernel_shape", []))
        if len(kernel) != nd:
            raise Unsupported(f"kernel_shape {kernel} for a {nd}-d input")
        p = spatial_params(node, x.shape, kernel, bool(node.attr("ceil_mode", 0)), pool=True)
        p["kernel"] = kernel
        node.extra["p"] = p
        return [((*x.shape[:2], *p["out"]), x.dtype)]

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        p = node.extra["p"]
        kind = 0 if self.kind == "max" else (2 if int(node.attr("count_include_pad", 0)) else 1)
        t = x.ctype
        acc = "double" if t == "double" else ("float" if t == "float" else t)
        code = (
            csrc_float.POOL.replace("{T}", t).replace("{ACC}", acc).replace("{INIT}", f"({acc})0")
        )
        cg.helper(f"pool_{t}", code)
        return window_arrays(x.shape, p) + (
            f"  gp_pool_{t}({cg.ptr(x.name)}, {cg.ptr(y.name)}, {x.shape[0] * x.shape[1]}, "
            f"in_, out_, k_, s_, d_, pb_, pe_, {kind});"
        )


class GlobalAveragePool(Op):
    def infer(self, node, ins):
        x = need(ins, 0, "X")
        float_only(node, x)
        if len(x.shape) < 3:
            raise Unsupported(f"rank {len(x.shape)} input")
        return [((*x.shape[:2], *[1] * (len(x.shape) - 2)), FLOAT)]

    def emit(self, node, cg):
        x = cg.t(node.inputs[0])
        nc = x.shape[0] * x.shape[1]
        hw = x.size // max(1, nc)
        return (
            f"  const float *x = {cg.ptr(x.name)};\n  float *y = {cg.ptr(node.outputs[0])};\n"
            f"  long c, i;\n  for (c = 0; c < {nc}; ++c) {{\n    float s = 0.f;\n"
            f"    for (i = 0; i < {hw}; ++i) s += x[c * {hw} + i];\n"
            f"    y[c] = s / {c_float(hw)};\n  }}"
        )


class Softmax(Op):
    inplace = (0,)

    def infer(self, node, ins):
        x = need(ins, 0, "input")
        float_only(node, x)
        r = len(x.shape)
        if r == 0:
            raise Unsupported("scalar input")
        axis = norm_axis(int(node.attr("axis", -1 if node.opset >= 13 else 1)), r, node)
        shp = x.shape
        outer = int(np.prod(shp[:axis], dtype=np.int64))
        if node.opset >= 13:
            n, inner = shp[axis], int(np.prod(shp[axis + 1 :], dtype=np.int64))
        else:  # opset < 13: softmax over the flattened trailing block
            n, inner = int(np.prod(shp[axis:], dtype=np.int64)), 1
        node.extra.update(outer=outer, n=n, inner=inner)
        return [(x.shape, FLOAT)]

    def emit(self, node, cg):
        e = node.extra
        if not e["n"] or not e["outer"] or not e["inner"]:
            return "  /* empty */"
        cg.helper("softmax", csrc_float.SOFTMAX)
        return (
            f"  gp_softmax_f32({cg.ptr(node.inputs[0])}, {cg.ptr(node.outputs[0])}, "
            f"{e['outer']}, {e['n']}, {e['inner']});"
        )


class Reduce(Op):
    """``ReduceSum`` / ``ReduceMean`` over ``axes`` (all when absent, none with
    ``noop_with_empty_axes``): ``y = sum(x)`` (``/ count`` for the mean), accumulated in the
    output. ``axes`` is an input from ``axes_input_since`` on, an attribute before."""

    def __init__(self, kind: str, axes_input_since: int):
        self.kind, self.since = kind, axes_input_since

    def infer(self, node, ins):
        x = need(ins, 0, "data")
        if self.kind == "mean":
            float_only(node, x)
        elif x.dtype not in NUMERIC:
            raise Unsupported(f"dtype {x.dtype}")
        r = len(x.shape)
        axes = node.attr("axes") if node.opset < self.since else const_ints(ins, 1, "axes")
        keep = int(node.attr("keepdims", 1))
        if not axes:
            if int(node.attr("noop_with_empty_axes", 0)):
                axes = []
            else:
                axes = list(range(r))
        axes = sorted({norm_axis(int(a), r, node) for a in axes})
        count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
        if count == 0 and self.kind == "mean":
            raise Unsupported("mean over an empty axis")
        out = [1 if i in axes else d for i, d in enumerate(x.shape)]
        node.extra.update(keep_shape=out, count=count)
        if not keep:
            out = [d for i, d in enumerate(x.shape) if i not in axes]
        return [(out, x.dtype)]

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        kshape = node.extra["keep_shape"]
        shp, (xs, ys) = collapse(x.shape, [strides_of(x.shape), broadcast_strides(kshape, x.shape)])
        body = f"y[{index_expr('i', ys)}] += x[{index_expr('i', xs)}];"
        code = (
            f"  const {x.ctype} *x = {cg.ptr(x.name)};\n  {y.ctype} *y = {cg.ptr(y.name)};\n"
            f"  {{ long j; for (j = 0; j < {y.size}; ++j) y[j] = 0; }}\n"
            + (loop_nest(shp, body) if x.size else "  (void)x;")
        )
        if self.kind == "mean":
            code += (
                f"\n  {{ long j; for (j = 0; j < {y.size}; ++j) y[j] /= "
                f"{c_float(node.extra['count'])}; }}"
            )
        return code


POOL_OPS: dict[str, Op] = {
    "MaxPool": Pool("max"),
    "AveragePool": Pool("avg"),
    "GlobalAveragePool": GlobalAveragePool(),
    "Softmax": Softmax(),
    "ReduceMean": Reduce("mean", 18),
    "ReduceSum": Reduce("sum", 13),
}
