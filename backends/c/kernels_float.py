"""Compute ops: element-wise (numeric dtypes where ONNX allows them), and the float32 kernels
(Conv, Gemm, MatMul, BatchNormalization); pooling, Softmax and ReduceMean are in
:mod:`.kernels_pool`.

Each entry is an :class:`~.opbase.Op`: ``infer`` checks attributes and dtypes and computes
output shapes, ``emit`` returns C statements with every shape a literal. Heavy kernels call a
shared ``static`` helper from :mod:`.csrc_float` (or the packed convolution in
:mod:`.conv_fast`)."""

from __future__ import annotations

import numpy as np

from . import conv_dw, conv_fast, csrc_float, sparse
from .ctext import (
    act_args,
    act_expr,
    broadcast_strides,
    c_float,
    c_scalar,
    collapse,
    index_expr,
    loop_nest,
    strides_of,
)
from .ir import FLOAT, Node, Unsupported
from .opbase import (
    FAST,
    ConvGeometry,
    EmitContext,
    Op,
    broadcast_shape,
    float_only,
    need,
    opt,
    spatial_params,
)

NUMERIC = {
    np.dtype(t)
    for t in (
        np.float32,
        np.float64,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
    )
}
_UNSIGNED_OF = {
    "int8_t": "uint32_t",
    "int16_t": "uint32_t",
    "int32_t": "uint32_t",
    "int64_t": "uint64_t",
    "uint8_t": "uint32_t",
    "uint16_t": "uint32_t",
    "uint32_t": "uint32_t",
    "uint64_t": "uint64_t",
}


# -- element-wise --------------------------------------------------------------------------
class Binary(Op):
    inplace = (0, 1)

    def __init__(self, sym: str):
        self.sym = sym

    def infer(self, node, ins):
        a, b = need(ins, 0, "A"), need(ins, 1, "B")
        if a.dtype != b.dtype or a.dtype not in NUMERIC:
            raise Unsupported(f"dtypes {a.dtype}/{b.dtype}")
        return [(broadcast_shape(a.shape, b.shape), a.dtype)]

    def expr(self, a: str, b: str, ctype: str) -> str:
        if ctype in ("float", "double"):
            return f"{a} {self.sym} {b}"
        if self.sym == "/":
            return f"({b} == 0 ? ({ctype})0 : ({ctype})({a} / {b}))"
        u = _UNSIGNED_OF[ctype]
        return f"({ctype})(({u}){a} {self.sym} ({u}){b})"

    def emit(self, node, cg):
        a, b, y = (cg.t(n) for n in (node.inputs[0], node.inputs[1], node.outputs[0]))
        shp, (ys, as_, bs) = collapse(
            y.shape,
            [
                strides_of(y.shape),
                broadcast_strides(a.shape, y.shape),
                broadcast_strides(b.shape, y.shape),
            ],
        )
        e = self.expr(f"a[{index_expr('i', as_)}]", f"b[{index_expr('i', bs)}]", y.ctype)
        act = node.extra.get("act")
        if act:
            body = f"{{ const float v = {e}; y[{index_expr('i', ys)}] = {act_expr('v', act)}; }}"
        else:
            body = f"y[{index_expr('i', ys)}] = {e};"
        return (
            f"  const {a.ctype} *a = {cg.ptr(a.name)};\n"
            f"  const {b.ctype} *b = {cg.ptr(b.name)};\n"
            f"  {y.ctype} *y = {cg.ptr(y.name)};\n" + loop_nest(shp, body)
        )


class Unary(Op):
    """``y = f(x)`` element by element; ``fn(node, ctype)`` returns a C expression in ``v``."""

    inplace = (0,)

    def __init__(self, fn, dtypes=frozenset({FLOAT})):
        self.fn = fn
        self.dtypes = dtypes

    def infer(self, node, ins):
        x = need(ins, 0, "X")
        if x.dtype not in self.dtypes:
            raise Unsupported(f"dtype {x.dtype}")
        self.check(node, ins)
        return [(x.shape, x.dtype)]

    def check(self, node, ins) -> None:
        if len(node.outputs) != 1:
            raise Unsupported("more than one output")

    def prelude(self, node, cg) -> str:
        return ""

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        return (
            f"  const {x.ctype} *x = {cg.ptr(x.name)};\n  {y.ctype} *y = {cg.ptr(y.name)};\n"
            + self.prelude(node, cg)
            + f"  long i;\n  for (i = 0; i < {y.size}; ++i) {{ const {x.ctype} v = x[i]; "
            f"y[i] = {self.expr(node, x.ctype)}; }}"
        )

    def expr(self, node, ctype: str) -> str:
        return self.fn(node, ctype)


def _f(node: Node, key: str, default: float) -> str:
    return c_float(node.attr(key, default))


class Clip(Unary):
    def __init__(self):
        super().__init__(None, NUMERIC)

    def check(self, node, ins):
        x = ins[0]
        if node.opset < 11:
            lo, hi = node.attr("min"), node.attr("max")
            node.extra["lo"] = None if lo is None else c_scalar(lo, x.dtype)
            node.extra["hi"] = None if hi is None else c_scalar(hi, x.dtype)
            return
        for key, k in (("lo", 1), ("hi", 2)):
            t = opt(ins, k)
            if t is None:
                node.extra[key] = None
            elif t.value is not None:
                node.extra[key] = c_scalar(np.asarray(t.value).reshape(-1)[0], x.dtype)
            else:
                if t.size != 1 or t.dtype != x.dtype:
                    raise Unsupported(f"{key} bound {t.name!r} must be a scalar of the input dtype")
                node.extra[key] = ("runtime", t.name)

    def prelude(self, node, cg):
        out = ""
        for key in ("lo", "hi"):
            v = node.extra[key]
            if isinstance(v, tuple):
                out += f"  const {cg.t(node.inputs[0]).ctype} {key} = *{cg.ptr(v[1])};\n"
        return out

    def expr(self, node, ctype):
        e = "v"
        for key, cmp in (("lo", "<"), ("hi", ">")):
            v = node.extra[key]
            if v is None:
                continue
            bound = key if isinstance(v, tuple) else v
            e = f"(({e}) {cmp} {bound} ? {bound} : ({e}))"
        return e


class BatchNorm(Op):
    inplace = (0,)

    def infer(self, node, ins):
        x = need(ins, 0, "X")
        ts = [need(ins, k, w) for k, w in enumerate(("X", "scale", "B", "mean", "var"))]
        float_only(node, *ts)
        if int(node.attr("training_mode", 0)) or len([o for o in node.outputs if o]) > 1:
            raise Unsupported("training mode (only inference BatchNormalization is supported)")
        if node.opset < 7 and not int(node.attr("is_test", 0)):
            raise Unsupported("is_test=0")
        if int(node.attr("spatial", 1)) != 1:
            raise Unsupported("spatial=0")
        c = x.shape[1] if len(x.shape) > 1 else 1
        if any(t.size != c for t in ts[1:]):
            raise Unsupported("per-channel parameters do not match the channel count")
        return [(x.shape, x.dtype)]

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        c = x.shape[1] if len(x.shape) > 1 else 1
        n = x.shape[0] if x.shape else 1
        inner = x.size // max(1, n * c)
        eps = float(node.attr("epsilon", 1e-5))
        s, b, m, v = (cg.t(i) for i in node.inputs[1:5])
        head = f"  const float *x = {cg.ptr(x.name)};\n  float *y = {cg.ptr(y.name)};\n"
        if all(t.value is not None for t in (s, b, m, v)):
            sc = s.value.astype(np.float64) / np.sqrt(v.value.astype(np.float64) + eps)
            sh = b.value.astype(np.float64) - m.value.astype(np.float64) * sc
            ka = cg.weight(sc.astype(np.float32).reshape(-1), "bn_scale")
            kb = cg.weight(sh.astype(np.float32).reshape(-1), "bn_shift")
            coef = f"  const float *ka = {ka}, *kb = {kb};\n"
            body = "y[j] = x[j] * ka[ci] + kb[ci];"
        else:
            coef = (
                f"  const float *s = {cg.ptr(s.name)}, *b = {cg.ptr(b.name)}, "
                f"*m = {cg.ptr(m.name)}, *v = {cg.ptr(v.name)};\n"
            )
            body = f"y[j] = (x[j] - m[ci]) / sqrtf(v[ci] + {c_float(eps)}) * s[ci] + b[ci];"
        return (
            head + coef + f"  long ni, ci, k;\n  for (ni = 0; ni < {n}; ++ni)\n"
            f"    for (ci = 0; ci < {c}; ++ci)\n      for (k = 0; k < {inner}; ++k) {{\n"
            f"        const long j = (ni * {c} + ci) * {inner} + k;\n        {body}\n      }}"
        )


# -- convolution, gemm, matmul ---------------------------------------------------------------
class Conv(Op):
    inplace = (0,)  # the depthwise kernel only: conv_dw.may_overwrite

    def inplace_ok(self, node, k, cg_tensors):
        return conv_dw.may_overwrite(node, k, cg_tensors)

    def infer(self, node, ins):
        x, w, b = need(ins, 0, "X"), need(ins, 1, "W"), opt(ins, 2)
        float_only(node, x, w, b)
        if len(x.shape) not in (3, 4):
            raise Unsupported(f"{len(x.shape) - 2}-d convolution (1-d and 2-d are supported)")
        if len(w.shape) != len(x.shape):
            raise Unsupported(f"weight rank {len(w.shape)} does not match input rank")
        g = int(node.attr("group", 1))
        m, cg = w.shape[0], w.shape[1]
        kernel = list(node.attr("kernel_shape", w.shape[2:]))
        if list(kernel) != list(w.shape[2:]):
            raise Unsupported(f"kernel_shape {kernel} differs from the weight's {w.shape[2:]}")
        if g < 1 or x.shape[1] != cg * g or m % g:
            raise Unsupported(f"group={g} does not fit {x.shape[1]} input and {m} output channels")
        if b is not None and b.size != m:
            raise Unsupported(f"bias of {b.size} values for {m} output channels")
        p = spatial_params(node, x.shape, kernel)
        node.extra["geo"] = ConvGeometry.of(x.shape, w.shape, p, g)
        return [((x.shape[0], m, *p["out"]), FLOAT)]

    def prepare(self, node, tensors, sparse_ok):
        geo: ConvGeometry = node.extra["geo"]
        w = tensors[node.inputs[1]].value
        if w is None or (sparse_ok and sparse.best(w) is not None):
            return
        if "depthwise" in FAST and conv_dw.applicable(geo):
            node.extra.update(kernel="depthwise", scratch=conv_dw.scratch_bytes(geo))
        elif "packed" in FAST and conv_fast.applicable(geo):
            node.extra.update(kernel="packed", scratch=conv_fast.scratch_bytes(geo))

    def emit(self, node, cg):
        x, w, y = (cg.t(n) for n in (node.inputs[0], node.inputs[1], node.outputs[0]))
        b = cg.t(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        geo: ConvGeometry = node.extra["geo"]
        act = node.extra.get("act")
        bias = cg.ptr(b.name) if b is not None else "0"
        if node.extra.get("kernel") == "depthwise":
            return conv_dw.emit_float(cg, geo, w.value, bias, cg.ptr(x.name), cg.ptr(y.name), act)
        if w.value is not None:
            wv = np.asarray(w.value, np.float32)
            code = sparse.emit_conv(cg, node, geo, wv, cg.ptr(x.name), cg.ptr(y.name), bias)
            if code is not None:
                cg.helper("act", csrc_float.ACT)
                n_out = geo.N * geo.y_size
                return code + f"\n  gp_act_f32({cg.ptr(y.name)}, {n_out}, {act_args(act)});"
        if node.extra.get("kernel") == "packed":
            return conv_fast.emit(cg, geo, w.value, b, cg.ptr(x.name), cg.ptr(y.name), act)
        cg.helper("div", csrc_float.DIV)
        cg.helper("act", csrc_float.ACT)
        cg.helper("conv", csrc_float.CONV_GENERIC)
        return (
            f"  const float *x = {cg.ptr(x.name)};\n  float *y = {cg.ptr(y.name)};\n"
            f"  int n;\n  for (n = 0; n < {geo.N}; ++n) {{\n"
            f"    gp_conv2d_f32(x + (long)n * {geo.x_size}, {cg.ptr(w.name)}, {bias}, "
            f"y + (long)n * {geo.y_size}, {geo.args()});\n"
            f"    gp_act_f32(y + (long)n * {geo.y_size}, {geo.y_size}, {act_args(act)});\n"
            "  }"
        )


def _bias_add(
    cg: EmitContext, c_name: str, shape_mn: tuple[int, int], beta: float, alpha: float, act
) -> str:
    """``y = alpha * y + beta * C`` (C broadcast to M x N) and the fused activation."""
    M, N = shape_mn
    lines = []
    a = "" if alpha == 1.0 else f"{c_float(alpha)} * "
    if c_name:
        ct = cg.t(c_name)
        cs = broadcast_strides(ct.shape, (M, N))
        bterm = "" if beta == 1.0 else f"{c_float(beta)} * "
        lines.append(f"  const float *cc = {cg.ptr(c_name)};")
        e = f"{a}y[m * {N} + n] + {bterm}cc[m * {cs[0]} + n * {cs[1]}]"
    elif alpha != 1.0:
        e = f"{a}y[m * {N} + n]"
    elif not act:
        return ""
    else:
        e = f"y[m * {N} + n]"
    lines.append(
        f"  {{ long m, n; for (m = 0; m < {M}; ++m) for (n = 0; n < {N}; ++n) "
        f"{{ const float v = {e}; y[m * {N} + n] = {act_expr('v', act)}; }} }}"
    )
    return "\n".join(lines)


class Gemm(Op):
    def infer(self, node, ins):
        a, b, c = need(ins, 0, "A"), need(ins, 1, "B"), opt(ins, 2)
        float_only(node, a, b, c)
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise Unsupported("A and B must be 2-d")
        ta, tb = int(node.attr("transA", 0)), int(node.attr("transB", 0))
        M, K = (a.shape[1], a.shape[0]) if ta else a.shape
        K2, N = (b.shape[1], b.shape[0]) if tb else b.shape
        if K != K2:
            raise Unsupported(f"inner dimensions {K} and {K2} differ")
        if c is not None:
            broadcast_shape(c.shape, (M, N))
            if broadcast_shape(c.shape, (M, N)) != (M, N):
                raise Unsupported(f"C of shape {c.shape} does not broadcast to {(M, N)}")
        node.extra.update(M=M, N=N, K=K, ta=ta, tb=tb)
        return [((M, N), FLOAT)]

    def emit(self, node, cg):
        e = node.extra
        M, N, K = e["M"], e["N"], e["K"]
        a, b = cg.t(node.inputs[0]), cg.t(node.inputs[1])
        sam, sak = (1, M) if e["ta"] else (K, 1)
        c_name = node.inputs[2] if len(node.inputs) > 2 else ""
        beta = float(node.attr("beta", 1.0)) if c_name else 0.0
        post = _bias_add(
            cg,
            c_name if beta != 0.0 else "",
            (M, N),
            beta,
            float(node.attr("alpha", 1.0)),
            node.extra.get("act"),
        )
        if b.value is not None and not e["ta"]:
            w_nk = np.asarray(b.value if e["tb"] else b.value.T, np.float32)
            y = cg.ptr(node.outputs[0])
            code = sparse.emit_fc(cg, node, w_nk, M, cg.ptr(a.name), "y", "0")
            if code is not None:
                return f"  float *y = {y};\n{code}\n{post}"
        if b.value is not None:  # constant B: store it K x N so the inner loop is contiguous
            bk = b.value.T if e["tb"] else b.value
            bsym = cg.weight(np.ascontiguousarray(bk, np.float32), "gemm_b")
            sbk, sbn = N, 1
        else:
            bsym = cg.ptr(b.name)
            sbk, sbn = (1, K) if e["tb"] else (N, 1)
        cg.helper("gemm", csrc_float.GEMM)
        return (
            f"  float *y = {cg.ptr(node.outputs[0])};\n"
            f"  gp_gemm_f32({cg.ptr(a.name)}, {sam}, {sak}, {bsym}, {sbk}, {sbn}, y, "
            f"{M}, {N}, {K});\n" + post
        )


class MatMul(Op):
    def infer(self, node, ins):
        a, b = need(ins, 0, "A"), need(ins, 1, "B")
        float_only(node, a, b)
        if not a.shape or not b.shape:
            raise Unsupported("scalar operands")
        sa = (1, *a.shape) if len(a.shape) == 1 else a.shape
        sb = (*b.shape, 1) if len(b.shape) == 1 else b.shape
        if sa[-1] != sb[-2]:
            raise Unsupported(f"inner dimensions of {a.shape} and {b.shape} differ")
        batch = broadcast_shape(sa[:-2], sb[:-2])
        out = list(batch) + [sa[-2], sb[-1]]
        if len(a.shape) == 1:
            del out[-2]
        if len(b.shape) == 1:
            del out[-1]
        node.extra.update(sa=sa, sb=sb, batch=batch)
        return [(out, FLOAT)]

    def emit(self, node, cg):
        sa, sb, batch = node.extra["sa"], node.extra["sb"], node.extra["batch"]
        M, K, N = sa[-2], sa[-1], sb[-1]
        cg.helper("gemm", csrc_float.GEMM)
        ab = broadcast_strides(sa[:-2], batch) if batch else []
        bb = broadcast_strides(sb[:-2], batch) if batch else []
        ab = [s * M * K for s in ab]
        bb = [s * K * N for s in bb]
        ys = [s * M * N for s in strides_of(batch)]
        call = (
            f"gp_gemm_f32(a + {index_expr('i', ab)}, {K}, 1, b + {index_expr('i', bb)}, "
            f"{N}, 1, y + {index_expr('i', ys)}, {M}, {N}, {K});"
        )
        act = node.extra.get("act")
        body = loop_nest(batch, call) if batch else "  " + call
        post = ""
        if act:
            post = (
                f"\n  {{ long j; for (j = 0; j < {cg.t(node.outputs[0]).size}; ++j) "
                f"{{ const float v = y[j]; y[j] = {act_expr('v', act)}; }} }}"
            )
        return (
            f"  const float *a = {cg.ptr(node.inputs[0])};\n"
            f"  const float *b = {cg.ptr(node.inputs[1])};\n"
            f"  float *y = {cg.ptr(node.outputs[0])};\n" + body + post
        )


FLOAT_OPS: dict[str, Op] = {
    "Add": Binary("+"),
    "Sub": Binary("-"),
    "Mul": Binary("*"),
    "Div": Binary("/"),
    "Relu": Unary(lambda n, t: f"v > 0 ? v : ({t})0", NUMERIC),
    "LeakyRelu": Unary(lambda n, t: f"v >= 0.f ? v : {_f(n, 'alpha', 0.01)} * v"),
    "Sigmoid": Unary(lambda n, t: "1.f / (1.f + expf(-v))"),
    "Tanh": Unary(lambda n, t: "tanhf(v)"),
    "HardSigmoid": Unary(
        lambda n, t: f"fmaxf(0.f, fminf(1.f, {_f(n, 'alpha', 0.2)} * v + {_f(n, 'beta', 0.5)}))"
    ),
    "HardSwish": Unary(lambda n, t: "v * fmaxf(0.f, fminf(1.f, v * (1.f / 6.f) + 0.5f))"),
    "Clip": Clip(),
    "BatchNormalization": BatchNorm(),
    "Conv": Conv(),
    "Gemm": Gemm(),
    "MatMul": MatMul(),
}
