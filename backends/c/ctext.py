"""Small C-text helpers shared by the kernel tables: literals, strides, index expressions,
loop nests, strided copies, and the fused-activation expressions and arguments.

(:mod:`.codegen` assembles whole ``.h``/``.c`` files from the kernels' statements.)"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def strides_of(shape: Sequence[int]) -> list[int]:
    """Row-major element strides of ``shape``."""
    out = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        out[i] = out[i + 1] * int(shape[i + 1])
    return out


def broadcast_strides(shape: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    """Strides to read a tensor of ``shape`` broadcast (numpy rules) to ``out_shape``."""
    rank = len(out_shape)
    padded = [1] * (rank - len(shape)) + list(shape)
    st = strides_of(padded)
    return [0 if padded[i] == 1 and out_shape[i] != 1 else st[i] for i in range(rank)]


def collapse(
    shape: Sequence[int], strides: Sequence[Sequence[int]]
) -> tuple[list[int], list[list[int]]]:
    """Drop unit dimensions and merge neighbours that every operand walks contiguously.

    ``strides`` holds one stride list per operand. Returns the new shape and stride lists
    (at least one dimension)."""
    dims = [i for i, d in enumerate(shape) if d != 1]
    shp = [int(shape[i]) for i in dims]
    sts = [[int(s[i]) for i in dims] for s in strides]
    if not shp:
        return [1], [[0] for _ in strides]
    k = len(shp) - 1
    while k > 0:
        if all(s[k - 1] == s[k] * shp[k] for s in sts):
            shp[k - 1] *= shp[k]
            for s in sts:
                s[k - 1] = s[k]
                del s[k]
            del shp[k]
        k -= 1
    return shp, sts


def index_expr(var: str, strides: Sequence[int], offset: int = 0) -> str:
    terms = [f"{offset}"] if offset else []
    for i, s in enumerate(strides):
        if s == 1:
            terms.append(f"{var}{i}")
        elif s != 0:
            terms.append(f"{var}{i} * {s}")
    return " + ".join(terms) if terms else "0"


def loop_nest(shape: Sequence[int], body: str, var: str = "i", indent: str = "  ") -> str:
    """``for`` loops over ``shape`` (variables ``i0, i1, ...``, type long) around ``body``."""
    lines = []
    pad = indent
    for i, d in enumerate(shape):
        lines.append(f"{pad}for ({var}{i} = 0; {var}{i} < {d}; ++{var}{i})")
        pad += "  "
    lines.append(f"{pad}{body}")
    decl = f"{indent}long {', '.join(f'{var}{i}' for i in range(len(shape)))};"
    return decl + "\n" + "\n".join(lines)


def strided_copy(
    ctype: str,
    dst: str,
    src: str,
    shape: Sequence[int],
    dst_strides: Sequence[int],
    src_strides: Sequence[int],
    dst_off: int = 0,
    src_off: int = 0,
    indent: str = "  ",
) -> str:
    """Copy ``src`` into ``dst`` elementwise over ``shape`` with the given strides/offsets."""
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return f"{indent}/* empty */"
    shp, (ds, ss) = collapse(shape, [dst_strides, src_strides])
    if len(shp) == 1 and ds[0] == 1 and ss[0] == 1:
        return f"{indent}memcpy({dst} + {dst_off}, {src} + {src_off}, {shp[0]} * sizeof({ctype}));"
    if ds[-1] == 1 and ss[-1] == 1 and shp[-1] >= 8:
        n = shp[-1]
        outer = shp[:-1]
        body = (
            f"memcpy({dst} + {index_expr('i', ds[:-1], dst_off)}, "
            f"{src} + {index_expr('i', ss[:-1], src_off)}, {n} * sizeof({ctype}));"
        )
        return loop_nest(outer, body, indent=indent)
    body = f"{dst}[{index_expr('i', ds, dst_off)}] = {src}[{index_expr('i', ss, src_off)}];"
    return loop_nest(shp, body, indent=indent)


def c_float(v: float) -> str:
    """An exact C literal of a float32 value."""
    v = float(np.float32(v))
    if np.isnan(v):
        return "NAN"
    if np.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    return f"{v:#.9g}f"


def c_double(v: float) -> str:
    v = float(v)
    if np.isnan(v):
        return "NAN"
    if np.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    return f"{v:#.17g}"


def c_scalar(v, dtype: np.dtype) -> str:
    """A C literal for one value of ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return c_float(v)
    if dtype == np.float64:
        return c_double(v)
    if dtype == np.bool_:
        return "1" if v else "0"
    iv = int(v)
    if dtype == np.int64:
        if iv == -(2**63):
            return "INT64_MIN"
        return f"INT64_C({iv})"
    if dtype == np.uint64:
        return f"UINT64_C({iv})"
    if dtype == np.int32 and iv == -(2**31):
        return "INT32_MIN"
    if dtype in (np.uint32,):
        return f"{iv}u"
    return str(iv)


def c_array_body(arr: np.ndarray, per_line: int = 8) -> str:
    """The comma-separated initializer values of ``arr`` (flattened)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    dt = flat.dtype
    if flat.size == 0:
        return "0"
    if dt == np.float32:
        if np.isfinite(flat).all():
            items = list(map("{:#.9g}f".format, flat.tolist()))
        else:
            items = [c_float(v) for v in flat.tolist()]
    elif dt == np.float64:
        items = [c_double(v) for v in flat.tolist()]
    elif dt == np.bool_:
        items = ["1" if v else "0" for v in flat.tolist()]
    elif dt in (np.int64, np.uint64, np.int32, np.uint32):
        items = [c_scalar(v, dt) for v in flat.tolist()]
    else:
        items = [str(v) for v in flat.tolist()]
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    return ",\n  ".join(lines)


def int_list(values: Sequence[int]) -> str:
    return "{" + ", ".join(str(int(v)) for v in values) + "}"


# -- fused activations: None, ("relu",) or ("clip", lo, hi) ---------------------------------
def act_expr(v: str, act: tuple | None) -> str:
    """C expression applying a fused activation to the expression ``v``."""
    if not act:
        return v
    if act[0] == "relu":
        return f"({v} > 0.f ? {v} : 0.f)"
    lo, hi = c_float(act[1]), c_float(act[2])
    return f"(({v} < {lo} ? {lo} : {v}) > {hi} ? {hi} : ({v} < {lo} ? {lo} : {v}))"


def act_args(act: tuple | None) -> str:
    """The ``int act, float lo, float hi`` arguments of the C helpers that apply a fused
    activation (``gp_act_f32``, the packed and pointwise convolutions): 0 none, 1 relu, 2 clip."""
    if not act:
        return "0, 0.f, 0.f"
    if act[0] == "relu":
        return "1, 0.f, 0.f"
    return f"2, {c_float(act[1])}, {c_float(act[2])}"
