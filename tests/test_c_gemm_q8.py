"""The int8 GEMM paths of :mod:`graphopt.backends.c.conv_q8` against the generic kernels.

Fully-connected layers (Gemm with ``transB``, MatMul over a 3-D input: several rows, more
than one tile of them), convs over few taps x channels (im2col + the pixel-vectorised
kernel), pointwise convs over more than 64 channels and the dot products' single-pixel tail:
each compiled at ``-O3 -march=native`` with and without ``opbase.FAST["int8-gemm"]``, equal
bit for bit and within one output step of ORT running the QDQ model as float ops. Ties of
the double-precision row requantisation are checked against the reference formula.
"""

from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.c import build_many
from graphopt.backends.c.build import STRICT, find_compiler
from graphopt.backends.c.conv_fast import NOUNROLL
from graphopt.backends.c.csrc_int8 import SIMD, requant_row, saturation_caps

from .test_c_depthwise import FLAGS, _both, _conv, _near_ort, _ref_int8, _source

# (rows shape, K, N, Gemm with transB (else MatMul))
FC = [
    ((1, 37), 37, 13, True),
    ((1, 1280), 1280, 1000, True),
    ((3, 70), 70, 6, True),
    ((2, 15, 33), 33, 9, False),  # 30 rows: two tiles of rows
    ((1, 5), 5, 3, False),
]

# (C, M, H, W, K, stride, pads [t, l, b, r], group, dilation)
CONVS = [
    (3, 10, 20, 18, 3, 2, [1, 1, 1, 1], 1, 1),  # 27 taps x channels: im2col + pointwise
    (2, 7, 12, 12, 5, 1, [2, 1, 0, 3], 1, 2),  # 50, dilated, asymmetric padding
    (1, 5, 9, 8, 3, 1, [0, 0, 0, 0], 1, 1),  # 9, unpadded
    (100, 9, 6, 7, 1, 1, [0, 0, 0, 0], 1, 1),  # pointwise over 100 channels
    (40, 11, 2, 2, 1, 1, [0, 0, 0, 0], 1, 1),  # 4 pixels: a 4 x 3 block and a 4 x 1 tail
    (24, 8, 5, 1, 1, 1, [1, 0, 1, 0], 1, 1),  # padded 1x1 over 7 pixels: 2 blocks, 1 tail
]


def _fc(case, rng, quant: str):
    """A one-layer QDQ model: per-channel int8 weights, ``quant`` activations (int8, uint8,
    int8-zp: weights with non-zero zero points)."""
    shape, k, n, gemm = case
    act = np.uint8 if quant == "uint8" else np.int8
    zx, zy = (128, 120) if act == np.uint8 else (3, -5)
    wf = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    sw = (np.abs(wf).max(1) / 127).astype(np.float32)
    zw = rng.integers(-20, 20, n).astype(np.int8) if quant == "int8-zp" else np.zeros(n, np.int8)
    wq = np.clip(np.round(wf / sw[:, None]) + zw[:, None], -128, 127).astype(np.int8)
    if not gemm:  # MatMul: B is [K][N], per-channel along axis 1
        wq = np.ascontiguousarray(wq.T)
    b = rng.standard_normal(n).astype(np.float32)
    inits = [
        numpy_helper.from_array(wq, "wq"),
        numpy_helper.from_array(sw, "sw"),
        numpy_helper.from_array(zw, "zw"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(np.array(0.04, np.float32), "sx"),
        numpy_helper.from_array(np.array(zx, act), "zx"),
        numpy_helper.from_array(np.array(0.05, np.float32), "sy"),
        numpy_helper.from_array(np.array(zy, act), "zy"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], axis=0 if gemm else 1),
    ]
    if gemm:
        nodes.append(helper.make_node("Gemm", ["xf", "w", "b"], ["c"], transB=1))
    else:
        nodes.append(helper.make_node("MatMul", ["xf", "w"], ["c"]))  # no bias
    nodes += [
        helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "fc", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("kind", ["int8", "uint8", "int8-zp"])
def test_fc_matches_the_generic_kernel(kind):
    rng = np.random.default_rng(5)
    models = {f"f{i}": _fc(case, rng, kind) for i, case in enumerate(FC)}
    built = _both(models, "int8-gemm")
    for i, case in enumerate(FC):
        spec, gen = built[f"f{i}"]
        src_spec, src_gen = _source(spec), _source(gen)
        assert "gp_qfc_" in src_gen, case
        assert "gp_q8fc_" in src_spec and "gp_qfc_" not in src_spec, case
        x = rng.uniform(-3, 3, case[0]).astype(np.float32)
        (a,), (b,) = spec.run(x), gen.run(x)
        np.testing.assert_array_equal(a, b, err_msg=str(case))
        _near_ort(models[f"f{i}"], x, a, case, step=0.05)


@pytest.mark.parametrize("kind", ["int8", "uint8", "int8-zp"])
def test_small_convs_match_the_generic_kernel(kind):
    rng = np.random.default_rng(6)
    models = {f"c{i}": _conv(case, rng, kind) for i, case in enumerate(CONVS)}
    built = _both(models, "int8-gemm")
    for i, case in enumerate(CONVS):
        spec, gen = built[f"c{i}"]
        assert "gp_qconv_" in _source(gen) and "gp_qconv_" not in _source(spec), case
        if i < 3:
            assert "gp_q8col_" in _source(spec), case
        x = rng.uniform(-3, 3, (1, case[0], *case[2:4])).astype(np.float32)
        (a,), (b,) = spec.run(x), gen.run(x)
        np.testing.assert_array_equal(a, b, err_msg=str(case))
        _near_ort(models[f"c{i}"], x, a, case)


@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_simd_build_equals_the_portable_one(kind):
    """With -DGP_SIMD (where the compiler targets AVX2) the same outputs bit for bit."""
    rng = np.random.default_rng(7)
    models = {f"c{i}": _conv(case, rng, kind) for i, case in enumerate(CONVS)}
    models.update({f"f{i}": _fc(case, rng, kind) for i, case in enumerate(FC)})
    portable = build_many(models, flags=FLAGS)
    simd = build_many(models, flags=(*FLAGS, "-DGP_SIMD"))
    for i, case in enumerate(CONVS):
        x = rng.uniform(-3, 3, (1, case[0], *case[2:4])).astype(np.float32)
        (a,), (b,) = simd[f"c{i}"].run(x), portable[f"c{i}"].run(x)
        np.testing.assert_array_equal(a, b, err_msg=str(case))
    for i, case in enumerate(FC):
        x = rng.uniform(-3, 3, case[0]).astype(np.float32)
        (a,), (b,) = simd[f"f{i}"].run(x), portable[f"f{i}"].run(x)
        np.testing.assert_array_equal(a, b, err_msg=str(case))


def test_row_requantisation_rounds_ties_away_from_zero(tmp_path):
    """Multipliers that are powers of two (and 3 * 2^k) put many products exactly on a half;
    shifts on both sides of the double-precision path's limit (t = 42)."""
    code = "#include <stdint.h>\n" + NOUNROLL + SIMD
    name, body = requant_row("int8_t")
    code += body + (
        "void rq(const int32_t *a, const int32_t *m, const int32_t *s, const uint32_t *cap,\n"
        "        int8_t *y, long rows, long n)\n{\n  long r;\n  for (r = 0; r < rows; ++r)\n"
        f"    {name}(a + r * n, y + r * n, n, m[r], s[r], cap[r], 0, -128, 127);\n}}\n"
    )
    (tmp_path / "rq.c").write_text(code)
    lib = tmp_path / "rq.so"
    cmd = [find_compiler(), *STRICT, *FLAGS, "-shared", "-fPIC", str(tmp_path / "rq.c")]
    subprocess.run([*cmd, "-o", str(lib)], check=True)
    rng = np.random.default_rng(8)
    ts = np.arange(32, 47)
    qm = np.array([2**30 if i % 2 else 3 * 2**29 for i in range(len(ts))], np.int64)
    qs = ts - 31
    n = 41
    acc = np.zeros((len(ts), n), np.int64)
    for r, t in enumerate(ts):
        unit = max(1, (1 << int(t)) // int(qm[r]))  # |acc| of one output step
        half = np.arange(-20, 21) * unit + unit // 2  # on or near ties
        acc[r] = np.clip(half + rng.integers(-1, 2, n) * (r % 3 == 0), -(2**31), 2**31 - 1)
    caps = saturation_caps(qm, qs)
    a, m, s = (np.ascontiguousarray(v, np.int32) for v in (acc, qm, qs))
    y = np.zeros(acc.shape, np.int8)
    ptr = ctypes.c_void_p
    ctypes.CDLL(str(lib)).rq(
        *(ptr(v.ctypes.data) for v in (a, m, s, caps, y)),
        ctypes.c_long(len(ts)),
        ctypes.c_long(n),
    )
    want = [
        [_ref_int8(int(v), int(qm[r]), int(qs[r]), 0, -128, 127) for v in acc[r]]
        for r in range(len(ts))
    ]
    np.testing.assert_array_equal(y.astype(np.int64), np.array(want))
