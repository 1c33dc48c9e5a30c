"""The specialised conv kernels against the generic ones they replace.

Each case is a one-conv model compiled twice at ``-O3 -march=native`` (the vectorised code
paths): with the specialised kernels (``opbase.FAST``) and with the generic ones only. Float
(depthwise, packed): equal within 1e-5 of the output range. int8 (depthwise, the int16 dot
product GEMM): equal bit for bit, and within one quantization step of ORT running the QDQ
model as float ops. Shapes include odd sizes, stride 2, asymmetric padding, dilation, groups,
a channel multiplier (not depthwise: the generic path) and uint8 activations. Where the
compiler targets AVX2, the ``-DGP_SIMD`` build equals the portable one bit for bit. The
requantisation helpers are checked against the reference formula on random and edge values.
"""

from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.c import build_many, opbase
from graphopt.backends.c.build import STRICT, find_compiler
from graphopt.backends.c.conv_fast import NOUNROLL
from graphopt.backends.c.csrc_int8 import REQUANT, SIMD, requant_row, saturation_caps

FLAGS = ("-O3", "-march=native")

# (C, M, H, W, K, stride, pads [t, l, b, r], group, dilation)
DEPTHWISE = [
    (8, 8, 9, 11, 3, 1, [1, 1, 1, 1], 8, 1),
    (5, 5, 10, 7, 3, 2, [1, 0, 0, 1], 5, 1),
    (3, 3, 13, 17, 5, 2, [2, 2, 2, 2], 3, 1),
    (4, 4, 6, 40, 5, 1, [2, 1, 0, 3], 4, 1),
    (4, 4, 9, 9, 3, 1, [2, 2, 2, 2], 4, 2),
    (6, 6, 2, 2, 3, 1, [1, 1, 1, 1], 6, 1),
    (7, 7, 5, 33, 3, 2, [0, 0, 0, 0], 7, 1),
    (3, 6, 8, 8, 3, 1, [1, 1, 1, 1], 3, 1),  # channel multiplier 2: not depthwise
]
REGULAR = [
    (3, 16, 15, 13, 7, 2, [3, 3, 3, 3], 1, 1),
    (16, 24, 8, 8, 1, 1, [0, 0, 0, 0], 1, 1),  # 1x1: rows straight from channels-last
    (20, 12, 9, 7, 1, 2, [0, 0, 0, 0], 1, 1),
    (12, 20, 7, 9, 3, 1, [1, 0, 2, 1], 1, 1),
    (8, 6, 11, 10, 3, 2, [1, 1, 1, 1], 2, 1),
    (6, 10, 9, 9, 3, 1, [2, 2, 2, 2], 1, 2),
    (33, 5, 3, 3, 3, 1, [1, 1, 1, 1], 1, 1),
]


def _conv(case, rng, quant: str | None, sy: float = 0.25):
    """A one-conv model: float, or QDQ with int8 per-channel weights, ``quant`` (int8, uint8,
    int8-zp: weights with non-zero zero points) activations and output scale ``sy``."""
    c, m, h, w, k, s, pads, g, d = case
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    wf = rng.standard_normal((m, c // g, k, k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    attrs = dict(group=g, strides=[s, s], pads=pads, dilations=[d, d])
    if quant is None:
        inits = [numpy_helper.from_array(wf, "w"), numpy_helper.from_array(b, "b")]
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs)]
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    else:
        act = np.uint8 if quant == "uint8" else np.int8
        zx, zy = (128, 120) if act == np.uint8 else (3, -5)
        sw = (np.abs(wf).reshape(m, -1).max(1) / 127).astype(np.float32)
        zw = (
            rng.integers(-20, 20, m).astype(np.int8) if quant == "int8-zp" else np.zeros(m, np.int8)
        )
        wq = np.clip(np.round(wf / sw[:, None, None, None]) + zw[:, None, None, None], -128, 127)
        inits = [
            numpy_helper.from_array(wq.astype(np.int8), "wq"),
            numpy_helper.from_array(sw, "sw"),
            numpy_helper.from_array(zw, "zw"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.array(0.04, np.float32), "sx"),
            numpy_helper.from_array(np.array(zx, act), "zx"),
            numpy_helper.from_array(np.array(sy, np.float32), "sy"),
            numpy_helper.from_array(np.array(zy, act), "zy"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"]),
            helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], axis=0),
            helper.make_node("Conv", ["xf", "w", "b"], ["c"], **attrs),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"]),
        ]
    graph = helper.make_graph(nodes, "conv", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _both(models: dict, fast: str):
    """{name: (specialised CModel, generic CModel)}; only ``fast`` is turned off for the
    second build."""
    spec = build_many(models, flags=FLAGS)
    opbase.FAST.discard(fast)
    try:
        gen = build_many(models, flags=FLAGS)
    finally:
        opbase.FAST.add(fast)
    return {k: (spec[k], gen[k]) for k in models}


def _source(cm) -> str:
    for d in (cm.path.parent / cm.name, cm.path.parent):
        if (d / f"{cm.name}.c").exists():
            return (d / f"{cm.name}.c").read_text()
    raise FileNotFoundError(cm.name)


@pytest.mark.parametrize("kind", ["float", "int8", "uint8", "int8-zp"])
def test_depthwise_matches_the_generic_kernel(kind):
    rng = np.random.default_rng(1)
    quant = None if kind == "float" else kind
    models = {f"m{i}": _conv(case, rng, quant) for i, case in enumerate(DEPTHWISE)}
    built = _both(models, "depthwise")
    for i, case in enumerate(DEPTHWISE):
        spec, gen = built[f"m{i}"]
        assert ("gp_dw_" in _source(spec)) == (case[0] == case[1]), case
        assert "gp_dw_" not in _source(gen)
        x = rng.uniform(-3, 3, (1, *case[0:1], *case[2:4])).astype(np.float32)
        (a,), (b,) = spec.run(x), gen.run(x)
        if quant is None:
            assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.ptp(b)), case
        else:
            np.testing.assert_array_equal(a, b, err_msg=str(case))
            _near_ort(models[f"m{i}"], x, a, case)


@pytest.mark.parametrize("kind", ["int8", "uint8", "int8-zp"])
def test_int8_gemm_matches_the_generic_kernel(kind):
    rng = np.random.default_rng(2)
    cases = REGULAR + DEPTHWISE[-1:]
    models = {f"m{i}": _conv(case, rng, kind) for i, case in enumerate(cases)}
    built = _both(models, "int8-gemm")
    for i, case in enumerate(cases):
        spec, gen = built[f"m{i}"]
        assert "gp_qconv_" in _source(gen) and "gp_qconv_" not in _source(spec), case
        x = rng.uniform(-3, 3, (1, case[0], *case[2:4])).astype(np.float32)
        (a,), (b,) = spec.run(x), gen.run(x)
        np.testing.assert_array_equal(a, b, err_msg=str(case))
        _near_ort(models[f"m{i}"], x, a, case)


def test_packed_float_conv_matches_the_generic_kernel():
    rng = np.random.default_rng(3)
    models = {f"m{i}": _conv(case, rng, None) for i, case in enumerate(REGULAR)}
    built = _both(models, "packed")
    for i, case in enumerate(REGULAR):
        spec, gen = built[f"m{i}"]
        assert "gp_conv2d_f32" in _source(gen)
        assert ("gp_conv2d_f32" in _source(spec)) == (case[1] // case[7] < 4), case
        x = rng.standard_normal((1, case[0], *case[2:4])).astype(np.float32)
        (a,), (b,) = spec.run(x), gen.run(x)
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.ptp(b)), case


def _near_ort(model, x, got, case, step: float = 0.25):
    """Within one output ``step`` of ORT running the QDQ ops as defined (no fusion)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so)
    ref = sess.run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= step * (1 + 1e-4), case


def test_requantisation_equals_the_reference_formula(tmp_path):
    """``gp_requant_clamp`` (branch-free, logical shifts) against round-half-away-from-zero
    of ``acc * qm / 2^(31 + qs)`` in exact integers, for every shift 1..62."""
    src = tmp_path / "rq.c"
    src.write_text(
        "#include <stdint.h>\n" + REQUANT + "void rq(const int32_t *a, const int32_t *m, "
        "const int32_t *s, int32_t *y, long n)\n{\n  long i;\n  for (i = 0; i < n; ++i)\n"
        "    y[i] = gp_requant_clamp(a[i], m[i], s[i], -3, -2147483647 - 1, 2147483647);\n}\n"
    )
    lib = tmp_path / "rq.so"
    cmd = [find_compiler(), *STRICT, *FLAGS, "-shared", "-fPIC", str(src), "-o", str(lib)]
    subprocess.run(cmd, check=True)
    rng = np.random.default_rng(0)
    n = 20000
    acc = rng.integers(-(2**31), 2**31, n)
    acc[:2000] = rng.integers(-4, 5, 2000)  # small values hit exact halves at small shifts
    acc[2000:2004] = [-(2**31), 2**31 - 1, -(2**31), 2**31 - 1]
    qm = rng.integers(2**30, 2**31, n)
    qm[2002:2004] = 2**31 - 1
    qm[2004:2100] = 0
    qs = rng.integers(1, 63, n) - 31
    a, m, s = (np.ascontiguousarray(v, np.int32) for v in (acc, qm, qs))
    y = np.zeros(n, np.int32)
    ptr = ctypes.c_void_p
    ctypes.CDLL(str(lib)).rq(
        ptr(a.ctypes.data),
        ptr(m.ctypes.data),
        ptr(s.ctypes.data),
        ptr(y.ctypes.data),
        ctypes.c_long(n),
    )

    def ref(v, mult, shift):
        t = 31 + shift
        p, half = v * mult, 1 << (t - 1)
        r = (p + half) >> t if p >= 0 else -((-p + half) >> t)
        return max(-(2**31), min(2**31 - 1, r - 3))

    want = [ref(int(v), int(mm), int(ss)) for v, mm, ss in zip(acc, qm, qs)]
    np.testing.assert_array_equal(y, np.array(want))


def _ref_int8(v, mult, shift, zy, lo, hi):
    t = 31 + shift
    p, half = v * mult, 1 << (t - 1)
    r = (p + half) >> t if p >= 0 else -((-p + half) >> t)
    return max(lo, min(hi, r + zy))


@pytest.mark.parametrize("simd", [False, True])
def test_row_requantisation_equals_the_reference_formula(tmp_path, simd):
    """``gp_requant_row`` (|acc| capped by ``saturation_caps``; with GP_SIMD the AVX2 path)
    on rows of 37 outputs, one (multiplier, shift) per row, int8 and uint8 outputs."""
    if simd and not _avx2():
        pytest.skip("the compiler does not target AVX2 here")
    code = "#include <stdint.h>\n" + NOUNROLL + SIMD
    for yt in ("int8_t", "uint8_t"):
        name, body = requant_row(yt)
        code += body + (
            f"void rq_{yt}(const int32_t *a, const int32_t *m, const int32_t *s, "
            f"const uint32_t *cap, {yt} *y, long rows, long n, int zy, int lo, int hi)\n{{\n"
            f"  long r;\n  for (r = 0; r < rows; ++r)\n"
            f"    {name}(a + r * n, y + r * n, n, m[r], s[r], cap[r], zy, lo, hi);\n}}\n"
        )
    src = tmp_path / "rqrow.c"
    src.write_text(code)
    lib = tmp_path / "rqrow.so"
    flags = [*FLAGS, "-DGP_SIMD"] if simd else list(FLAGS)
    subprocess.run(
        [find_compiler(), *STRICT, *flags, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True
    )
    dll = ctypes.CDLL(str(lib))
    rng = np.random.default_rng(1)
    rows, n = 400, 37
    qm = rng.integers(2**30, 2**31, rows)
    qm[:5] = [0, 2**31 - 1, 2**30, 0, 2**31 - 1]
    qs = rng.integers(1, 63, rows) - 31
    acc = np.zeros((rows, n), np.int64)
    for r in range(rows):  # around the saturation thresholds and the whole int32 range
        t = 31 + int(qs[r])
        scale = (1 << t) // max(int(qm[r]), 1)
        acc[r] = np.clip(
            rng.integers(-300, 300, n) * scale + rng.integers(-3, 4, n), -(2**31), 2**31 - 1
        )
        acc[r, :4] = [-(2**31), 2**31 - 1, 0, -1]
        acc[r, 4:8] = rng.integers(-(2**31), 2**31, 4)
    caps = saturation_caps(qm, qs)
    ptr = ctypes.c_void_p
    a, m, sh = (np.ascontiguousarray(v, np.int32) for v in (acc, qm, qs))
    for yt, dt, zy, lo, hi in (
        ("int8_t", np.int8, -5, -128, 127),
        ("uint8_t", np.uint8, 130, 7, 255),
    ):
        y = np.zeros((rows, n), dt)
        getattr(dll, f"rq_{yt}")(
            ptr(a.ctypes.data),
            ptr(m.ctypes.data),
            ptr(sh.ctypes.data),
            ptr(caps.ctypes.data),
            ptr(y.ctypes.data),
            ctypes.c_long(rows),
            ctypes.c_long(n),
            zy,
            lo,
            hi,
        )
        want = [
            [_ref_int8(int(v), int(qm[r]), int(qs[r]), zy, lo, hi) for v in acc[r]]
            for r in range(rows)
        ]
        np.testing.assert_array_equal(y.astype(np.int64), np.array(want), err_msg=yt)


def _avx2() -> bool:
    """Whether ``cc -march=native`` targets AVX2 (the GP_SIMD paths compile in)."""
    r = subprocess.run(
        [find_compiler(), *FLAGS, "-dM", "-E", "-x", "c", "-"],
        input="",
        capture_output=True,
        text=True,
    )
    return "__AVX2__" in r.stdout


@pytest.mark.parametrize("kind", ["int8", "uint8", "int8-zp"])
def test_simd_kernels_match_the_portable_ones(kind):
    """With GP_SIMD (AVX2 intrinsics: pointwise vpmaddwd, row requantisation) the int8 kernels
    give the portable kernels' outputs bit for bit."""
    if not _avx2():
        pytest.skip("the compiler does not target AVX2 here")
    rng = np.random.default_rng(4)
    cases = [
        (16, 24, 8, 8, 1, 1, [0, 0, 0, 0], 1, 1),
        (7, 13, 9, 11, 1, 1, [0, 0, 0, 0], 1, 1),  # odd channels, 99 pixels
        (33, 6, 6, 7, 1, 1, [0, 0, 0, 0], 1, 1),
        *DEPTHWISE[:4],
        REGULAR[3],
    ]
    models = {f"m{i}": _conv(case, rng, kind) for i, case in enumerate(cases)}
    portable = build_many(models, flags=FLAGS)
    simd = build_many(models, flags=(*FLAGS, "-DGP_SIMD"))
    for i, case in enumerate(cases):
        assert "gp_q8pw_" in _source(simd[f"m{i}"]) or i >= 3, case
        x = rng.uniform(-3, 3, (1, case[0], *case[2:4])).astype(np.float32)
        (a,), (b,) = simd[f"m{i}"].run(x), portable[f"m{i}"].run(x)
        np.testing.assert_array_equal(a, b, err_msg=str(case))
