"""Element-wise maths beyond :mod:`.kernels_float`'s arithmetic: unary functions (Sqrt, Exp,
Log, Erf, Reciprocal, Neg, Abs), Pow, comparisons and logic (bool results), IsNaN/IsInf,
Where, Cast and CastLike. All broadcast with numpy rules; bool tensors are ``uint8_t`` 0/1.

Casts from floating point to integers truncate toward zero like C, and saturate where C would
be undefined: NaN gives 0, values beyond the target's range give its minimum or maximum."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import TensorProto, helper

from .ctext import (
    broadcast_strides,
    c_double,
    c_scalar,
    collapse,
    index_expr,
    loop_nest,
    strides_of,
)
from .ir import C_TYPES, Unsupported
from .kernels_float import _UNSIGNED_OF, NUMERIC, Unary
from .opbase import Op, broadcast_shape, need

BOOL = np.dtype(np.bool_)
FLOATS = frozenset({np.dtype(np.float32), np.dtype(np.float64)})
SIGNED = frozenset(FLOATS | {np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64)})


def broadcast_loop(cg, ins: list[str], out: str, expr: Callable[[list[str]], str]) -> str:
    """C statements computing ``out`` element by element from the tensors ``ins`` broadcast to
    its shape; ``expr`` gets one C element expression per input and returns the value."""
    y, ts = cg.t(out), [cg.t(n) for n in ins]
    if not y.size:
        return "  /* empty */"
    shp, sts = collapse(
        y.shape, [strides_of(y.shape)] + [broadcast_strides(t.shape, y.shape) for t in ts]
    )
    decl = "".join(f"  const {t.ctype} *x{k} = {cg.ptr(t.name)};\n" for k, t in enumerate(ts))
    e = expr([f"x{k}[{index_expr('i', s)}]" for k, s in enumerate(sts[1:])])
    return (
        decl
        + f"  {y.ctype} *y = {cg.ptr(y.name)};\n"
        + loop_nest(shp, f"y[{index_expr('i', sts[0])}] = {e};")
    )


def _fn(name: str) -> Callable:
    """A libm function of ``v``: ``namef`` for float, ``name`` for double."""
    return lambda node, t: f"{name}{'f' if t == 'float' else ''}(v)"


def _neg(node, t: str) -> str:
    if t in ("float", "double"):
        return "-v"
    return f"({t})(({_UNSIGNED_OF[t]})0 - ({_UNSIGNED_OF[t]})v)"  # wraps, as ONNX Runtime


def _abs(node, t: str) -> str:
    if t in ("float", "double"):
        return f"fabs{'f' if t == 'float' else ''}(v)"
    if t.startswith("uint"):
        return "v"
    return f"(v < 0 ? {_neg(node, t)} : v)"


class IsNaN(Unary):
    """``y = x != x`` (bool)."""

    def __init__(self):
        super().__init__(lambda node, t: "v != v", FLOATS)

    def infer(self, node, ins):
        ((shape, _),) = super().infer(node, ins)
        return [(shape, BOOL)]


class IsInf(IsNaN):
    """``y = (x == +inf and detect_positive) or (x == -inf and detect_negative)`` (bool)."""

    def expr(self, node, ctype):
        terms = [
            f"v == {sign}INFINITY"
            for sign, key in (("", "detect_positive"), ("-", "detect_negative"))
            if int(node.attr(key, 1))
        ]
        return " || ".join(terms) or "0"


class Elementwise(Op):
    """``y = f(a, b, ...)`` over inputs broadcast together. ``dtypes``: allowed dtypes of the
    inputs (all the same); ``out``: the output dtype (None: the inputs')."""

    inplace = (0, 1)

    def __init__(self, fn: Callable[[list[str]], str], dtypes, out=None, arity: int = 2):
        self.fn, self.dtypes, self.out, self.arity = fn, frozenset(dtypes), out, arity

    def infer(self, node, ins):
        ts = [need(ins, k, f"input {k}") for k in range(self.arity)]
        if any(t.dtype != ts[0].dtype for t in ts) or ts[0].dtype not in self.dtypes:
            raise Unsupported(f"dtypes {[str(t.dtype) for t in ts]}")
        return [(broadcast_shape(*[t.shape for t in ts]), self.out or ts[0].dtype)]

    def emit(self, node, cg):
        return broadcast_loop(cg, node.inputs[: self.arity], node.outputs[0], self.fn)


def _cmp(sym: str) -> Elementwise:
    return Elementwise(lambda v: f"{v[0]} {sym} {v[1]}", NUMERIC, BOOL)


class Where(Op):
    """``y = cond ? x : y`` with all three broadcast together."""

    inplace = (1, 2)

    def infer(self, node, ins):
        c, x, y = need(ins, 0, "condition"), need(ins, 1, "X"), need(ins, 2, "Y")
        if c.dtype != BOOL:
            raise Unsupported(f"condition dtype {c.dtype}")
        if x.dtype != y.dtype:
            raise Unsupported(f"X and Y dtypes differ ({x.dtype}, {y.dtype})")
        return [(broadcast_shape(c.shape, x.shape, y.shape), x.dtype)]

    def emit(self, node, cg):
        return broadcast_loop(
            cg, node.inputs[:3], node.outputs[0], lambda v: f"{v[0]} ? {v[1]} : {v[2]}"
        )


class Pow(Op):
    """``z = x ** y``: ``powf``/``pow`` of the values converted to the base's type; a constant
    scalar exponent 2 or 3 is computed as ``x*x`` or ``x*x*x`` (as ONNX Runtime does). An
    integer base is computed in double and converted back."""

    inplace = (0,)

    def infer(self, node, ins):
        x, y = need(ins, 0, "X"), need(ins, 1, "Y")
        if x.dtype not in NUMERIC or y.dtype not in NUMERIC:
            raise Unsupported(f"dtypes {x.dtype}/{y.dtype}")
        return [(broadcast_shape(x.shape, y.shape), x.dtype)]

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.inputs[1])
        t = x.ctype
        if y.value is not None and y.size == 1 and float(y.value.reshape(-1)[0]) in (2.0, 3.0):
            n = int(y.value.reshape(-1)[0])
            return broadcast_loop(
                cg, node.inputs[:1], node.outputs[0], lambda v: f"({t})({' * '.join(v * n)})"
            )
        if t == "float":
            fn = lambda v: f"powf({v[0]}, (float){v[1]})"  # noqa: E731
        else:
            fn = lambda v: f"({t})pow((double){v[0]}, (double){v[1]})"  # noqa: E731
        return broadcast_loop(cg, node.inputs[:2], node.outputs[0], fn)


def _target(to: int) -> np.dtype:
    try:
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(to))
    except Exception:
        dt = None
    if dt not in C_TYPES:
        try:
            name = TensorProto.DataType.Name(to)
        except ValueError:
            name = str(to)
        raise Unsupported(f"target type {name}")
    return dt


def cast_expr(v: str, src: np.dtype, dst: np.dtype) -> str:
    """C expression converting ``v`` of dtype ``src`` to ``dst`` (see the module docstring)."""
    t = C_TYPES[dst]
    if dst == BOOL:
        return f"(uint8_t)({v} != 0)"
    if src in FLOATS and dst.kind in "iu":
        info = np.iinfo(dst)
        lo, hi = float(info.min) - (dst.kind == "u"), float(info.max) + 1.0  # both exact
        return (
            f"({v} != {v} ? ({t})0 : (double){v} <= {c_double(lo)} ? "
            f"{c_scalar(info.min, dst)} : (double){v} >= {c_double(hi)} ? "
            f"{c_scalar(info.max, dst)} : ({t}){v})"
        )
    return f"({t}){v}"


class Cast(Op):
    """``Cast`` (``to``) and ``CastLike`` (the second input's dtype) between float32/64,
    (u)int8..64 and bool."""

    inplace = (0,)

    def __init__(self, like: bool = False):
        self.like = like

    def infer(self, node, ins):
        x = need(ins, 0, "input")
        if self.like:
            dt = need(ins, 1, "target_type").dtype
        else:
            if node.attr("to") is None:
                raise Unsupported("missing attribute 'to'")
            dt = _target(int(node.attr("to")))
        return [(x.shape, dt)]

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        return broadcast_loop(
            cg, node.inputs[:1], node.outputs[0], lambda v: cast_expr(v[0], x.dtype, y.dtype)
        )


MATH_OPS: dict[str, Op] = {
    "Sqrt": Unary(_fn("sqrt"), FLOATS),
    "Exp": Unary(_fn("exp"), FLOATS),
    "Log": Unary(_fn("log"), FLOATS),
    "Erf": Unary(_fn("erf"), FLOATS),
    "Reciprocal": Unary(lambda node, t: f"({t})1 / v", FLOATS),
    "Neg": Unary(_neg, SIGNED),
    "Abs": Unary(_abs, NUMERIC),
    "Pow": Pow(),
    "IsNaN": IsNaN(),
    "IsInf": IsInf(),
    "Equal": Elementwise(lambda v: f"{v[0]} == {v[1]}", NUMERIC | {BOOL}, BOOL),
    "Less": _cmp("<"),
    "LessOrEqual": _cmp("<="),
    "Greater": _cmp(">"),
    "GreaterOrEqual": _cmp(">="),
    "Not": Elementwise(lambda v: f"!{v[0]}", {BOOL}, arity=1),
    "And": Elementwise(lambda v: f"{v[0]} && {v[1]}", {BOOL}),
    "Or": Elementwise(lambda v: f"{v[0]} || {v[1]}", {BOOL}),
    "Xor": Elementwise(lambda v: f"{v[0]} != {v[1]}", {BOOL}),
    "Where": Where(),
    "Cast": Cast(),
    "CastLike": Cast(like=True),
}
