"""``backends/c/ctext.py``: strides, collapsing, index expressions, loop nests, strided copies
and C literals, on cases with known answers. The generated copy loops are run by a tiny
C-to-Python translation and compared with numpy, so no compiler is needed."""

from __future__ import annotations

import itertools
import re
import textwrap

import numpy as np
import pytest

from graphopt.backends.c.ctext import (
    act_args,
    act_expr,
    broadcast_strides,
    c_array_body,
    c_double,
    c_float,
    c_scalar,
    collapse,
    index_expr,
    int_list,
    loop_nest,
    strided_copy,
    strides_of,
)


# -- strides ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, strides",
    [((), []), ((5,), [1]), ((2, 3, 4), [12, 4, 1]), ((4, 1, 3), [3, 3, 1]), ((0, 2), [2, 1])],
)
def test_strides_of(shape, strides):
    assert strides_of(shape) == strides
    if shape and 0 not in shape:
        assert strides == [s // 4 for s in np.zeros(shape, np.float32).strides]


@pytest.mark.parametrize(
    "shape, out_shape, strides",
    [
        ((2, 3, 4), (2, 3, 4), [12, 4, 1]),  # no broadcast
        ((4,), (2, 3, 4), [0, 0, 1]),  # leading dimensions added
        ((3, 1), (2, 3, 4), [0, 1, 0]),  # a unit dimension stretched
        ((1,), (5,), [0]),
        ((), (2, 2), [0, 0]),  # a scalar
        ((1, 1), (1, 1), [1, 1]),  # unit to unit keeps its stride (it is never walked)
    ],
)
def test_broadcast_strides(shape, out_shape, strides):
    assert broadcast_strides(shape, out_shape) == strides


def test_broadcast_strides_read_what_numpy_broadcasts():
    a = np.arange(6).reshape(3, 1, 2)
    out_shape = (4, 3, 5, 2)
    st = broadcast_strides(a.shape, out_shape)
    flat = a.reshape(-1)
    want = np.broadcast_to(a, out_shape)
    for idx in itertools.product(*map(range, out_shape)):
        assert flat[sum(i * s for i, s in zip(idx, st))] == want[idx]


# -- collapse -----------------------------------------------------------------------------------
def _offsets(shape, strides):
    return [
        tuple(sum(i * s for i, s in zip(idx, st)) for st in strides)
        for idx in itertools.product(*map(range, shape))
    ]


@pytest.mark.parametrize(
    "shape, strides, want",
    [
        # contiguous everywhere: one loop
        ((2, 3, 4), [[12, 4, 1], [12, 4, 1]], ([24], [[1], [1]])),
        # unit dimensions dropped, the rest merged
        ((2, 1, 3), [[3, 3, 1]], ([6], [[1]])),
        # a broadcast operand (stride 0 on axis 0) blocks merging axis 0 into axis 1
        ((2, 3), [[3, 1], [0, 1]], ([2, 3], [[3, 1], [0, 1]])),
        # the last two axes merge, the transposed first one does not
        ((2, 3, 4), [[12, 4, 1], [1, 8, 2]], ([2, 12], [[12, 1], [1, 2]])),
        # all unit: one dimension of 1, stride 0
        ((1, 1), [[1, 1], [1, 1]], ([1], [[0], [0]])),
    ],
)
def test_collapse_known_answers(shape, strides, want):
    assert collapse(shape, strides) == want


@pytest.mark.parametrize("seed", range(20))
def test_collapse_keeps_every_operands_offsets_in_order(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in rng.integers(1, 4, size=rng.integers(1, 5)))
    y = strides_of(shape)
    perm = rng.permutation(len(shape))
    transposed = [
        strides_of([shape[p] for p in perm])[list(perm).index(i)] for i in range(len(shape))
    ]
    bshape = tuple(d if rng.random() < 0.5 else 1 for d in shape)
    strides = [y, transposed, broadcast_strides(bshape, shape)]
    shp, sts = collapse(shape, strides)
    assert int(np.prod(shp)) == int(np.prod(shape))
    assert len(shp) <= len(shape) or shp == [1]
    assert _offsets(shp, sts) == _offsets(shape, strides)


# -- index expressions and loops ------------------------------------------------------------------
@pytest.mark.parametrize(
    "strides, offset, want",
    [
        ([12, 0, 1], 5, "5 + i0 * 12 + i2"),
        ([1], 0, "i0"),
        ([0, 0], 0, "0"),
        ([0], 7, "7"),
        ([], 0, "0"),
    ],
)
def test_index_expr(strides, offset, want):
    assert index_expr("i", strides, offset) == want


def test_loop_nest_text():
    assert loop_nest((2, 3), "x;") == (
        "  long i0, i1;\n  for (i0 = 0; i0 < 2; ++i0)\n    for (i1 = 0; i1 < 3; ++i1)\n      x;"
    )
    assert loop_nest((4,), "y;", var="j", indent="") == "long j0;\nfor (j0 = 0; j0 < 4; ++j0)\n  y;"


def _run_copy(code: str, dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Run the C statements ``strided_copy`` writes, translated line by line to Python."""
    out = []
    for line in textwrap.dedent(code).splitlines():
        pad = line[: len(line) - len(line.lstrip())]
        s = line.strip()
        if s.startswith("long ") or s == "/* empty */":
            continue
        m = re.fullmatch(r"for \((\w+) = 0; \1 < (\d+); \+\+\1\)", s)
        if m:
            out.append(f"{pad}for {m[1]} in range({m[2]}):")
            continue
        m = re.fullmatch(r"memcpy\(d \+ (.+), s \+ (.+), (\d+) \* sizeof\(\w+\)\);", s)
        if m:
            out.append(f"{pad}d[({m[1]}):({m[1]}) + {m[3]}] = s[({m[2]}):({m[2]}) + {m[3]}]")
            continue
        m = re.fullmatch(r"d\[(.+)\] = s\[(.+)\];", s)
        assert m, f"unexpected C line {s!r}"
        out.append(f"{pad}d[{m[1]}] = s[{m[2]}]")
    d, s = dst.reshape(-1).copy(), src.reshape(-1)
    exec("\n".join(out) or "pass", {"d": d, "s": s})
    return d.reshape(dst.shape)


def test_strided_copy_of_a_contiguous_block_is_one_memcpy():
    code = strided_copy("float", "d", "s", (4, 5), (5, 1), (5, 1))
    assert code == "  memcpy(d + 0, s + 0, 20 * sizeof(float));"


def test_strided_copy_of_an_empty_shape_copies_nothing():
    assert strided_copy("float", "d", "s", (3, 0), (0, 1), (0, 1)) == "  /* empty */"


def test_strided_copy_transpose_matches_numpy():
    src = np.arange(20, dtype=np.float32).reshape(5, 4)  # read as its transpose
    code = strided_copy("float", "d", "s", (4, 5), strides_of((4, 5)), (1, 4))
    assert "memcpy" not in code
    got = _run_copy(code, np.zeros((4, 5), np.float32), src)
    np.testing.assert_array_equal(got, src.T)


def test_strided_copy_into_a_slice_uses_row_memcpys():
    # concat along axis 1: src [4, 16] lands in columns 3..19 of dst [4, 32]
    src = np.arange(64, dtype=np.float32).reshape(4, 16)
    code = strided_copy("float", "d", "s", (4, 16), (32, 1), (16, 1), dst_off=3)
    assert "memcpy" in code and "for (i0 = 0; i0 < 4; ++i0)" in code
    want = np.zeros((4, 32), np.float32)
    want[:, 3:19] = src
    np.testing.assert_array_equal(_run_copy(code, np.zeros((4, 32), np.float32), src), want)


def test_strided_copy_broadcast_and_offsets_match_numpy():
    src = np.arange(10, dtype=np.float32)  # src[2:5] broadcast over 3 rows
    code = strided_copy("float", "d", "s", (3, 3), (3, 1), (0, 1), dst_off=1, src_off=2)
    got = _run_copy(code, np.zeros(10, np.float32), src)
    np.testing.assert_array_equal(got[1:10].reshape(3, 3), np.broadcast_to(src[2:5], (3, 3)))
    assert got[0] == 0


# -- literals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [0.0, 1.0, 0.1, -2.5e-3, 1e-38, 3.4028235e38, 1.17549435e-38, 7e-45])
def test_c_float_round_trips_float32(v):
    text = c_float(v)
    assert text.endswith("f")
    assert np.float32(float(text[:-1])) == np.float32(v)


def test_c_float_and_double_special_values():
    assert c_float(1.0) == "1.00000000f"
    assert c_float(float("nan")) == "NAN"
    assert c_float(float("inf")) == "INFINITY"
    assert c_float(-float("inf")) == "(-INFINITY)"
    with np.errstate(over="ignore"):
        assert c_float(1e39) == "INFINITY"  # beyond float32
    assert c_double(0.1) == "0.10000000000000001"
    assert float(c_double(1 / 3)) == 1 / 3
    assert c_double(float("-inf")) == "(-INFINITY)"


@pytest.mark.parametrize(
    "v, dtype, want",
    [
        (-(2**63), np.int64, "INT64_MIN"),  # -9223372036854775808 is not a C literal
        (3, np.int64, "INT64_C(3)"),
        (2**64 - 1, np.uint64, f"UINT64_C({2**64 - 1})"),
        (-(2**31), np.int32, "INT32_MIN"),
        (-5, np.int32, "-5"),
        (7, np.uint32, "7u"),
        (True, np.bool_, "1"),
        (False, np.bool_, "0"),
        (-128, np.int8, "-128"),
        (0.5, np.float32, "0.500000000f"),
        (0.5, np.float64, "0.50000000000000000"),
    ],
)
def test_c_scalar(v, dtype, want):
    assert c_scalar(v, dtype) == want


def test_c_array_body():
    assert c_array_body(np.arange(10, dtype=np.int8), per_line=4) == (
        "0, 1, 2, 3,\n  4, 5, 6, 7,\n  8, 9"
    )
    assert c_array_body(np.zeros(0, np.float32)) == "0"  # C forbids an empty initializer
    assert c_array_body(np.array([[1.5, np.inf]], np.float32)) == "1.50000000f, INFINITY"
    assert c_array_body(np.array([-(2**63)], np.int64)) == "INT64_MIN"
    assert c_array_body(np.array([True, False])) == "1, 0"
    assert int_list([1, 2, 3]) == "{1, 2, 3}"


# -- fused activations ------------------------------------------------------------------------
def _c_ternary_to_python(e: str) -> str:
    """``a ? b : c`` -> ``(b) if (a) else (c)``, innermost parentheses first."""
    parts: dict[str, str] = {}
    while m := re.search(r"\(([^()]*)\)", e):
        t = re.fullmatch(r"(.*) \? (.*) : (.*)", m[1])
        key = f"_{len(parts)}_"
        parts[key] = f"(({t[2]}) if ({t[1]}) else ({t[3]}))" if t else f"({m[1]})"
        e = e[: m.start()] + key + e[m.end() :]
    for key in reversed(parts):
        e = e.replace(key, parts[key])
    return re.sub(r"(\d)f\b", r"\1", e.replace(".f", ".0"))


@pytest.mark.parametrize(
    "act, fn",
    [
        (None, lambda v: v),
        (("relu",), lambda v: max(v, 0.0)),
        (("clip", 0.0, 6.0), lambda v: min(max(v, 0.0), 6.0)),
        (("clip", -1.5, 2.0), lambda v: min(max(v, -1.5), 2.0)),
    ],
)
def test_act_expr_computes_the_activation(act, fn):
    e = _c_ternary_to_python(act_expr("v", act))
    for v in (-7.0, -1.5, -0.25, 0.0, 0.5, 2.0, 6.0, 9.0):
        assert eval(e, {"v": v}) == fn(v), (act, v)


def test_act_args_encode_the_activation_for_the_c_helpers():
    assert act_args(None) == "0, 0.f, 0.f"
    assert act_args(()) == "0, 0.f, 0.f"
    assert act_args(("relu",)) == "1, 0.f, 0.f"
    assert act_args(("clip", 0.0, 6.0)) == "2, 0.00000000f, 6.00000000f"
