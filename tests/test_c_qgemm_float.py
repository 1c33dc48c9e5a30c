"""int8 layers whose output stays float (a quantized classifier's last Gemm/MatMul/1x1 conv).

``DQ(x_q) -> Gemm | MatMul | Conv (weight DQ(w_q)) -> y`` with no QuantizeLinear after it is
what ORT fuses into QGemm with float output (MatMulIntegerToFloat for MatMul): int32
accumulation of ``(x_q - zx) * (w_q - zw)`` plus an int32 bias, ``y = float(acc) * sc[n]``
with ``sc[n] = fl32(sx * sw[n])``, plus a float bias if the bias is not int32. The C backend
must keep such weights as int8 (dense, generic or sparse kernel, all bit-exact with each
other) and match ORT within the bound below; the const bytes of a model whose classifier
dominates fall to about 1/4 of fp32 (far less with 90% sparsity).

Bound (``u = 2^-24``, float32 unit roundoff; ``A[n] = sum_k |x_q - zx| |w_q - zw|``, an
integer): ORT's reference path rounds each dequantized value, each product and each of ``K``
partial sums; the C path rounds ``float(acc)``, ``sc`` and the product; each adds a bias
with one rounding. Both are within ``(K + 4) u sc[n] A[n] + u (|b| + |y|)`` of the exact
value, so they differ by at most ``TOL(n) = (2K + 8) u sc[n] A[n] + 2u (|b[n]| + |y|)``.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.backends.c import build, build_many, compile_program
from graphopt.backends.onnxruntime import export, ort_quantize_static, session
from graphopt.cpu import cpu_int8

from .test_c_depthwise import FLAGS, _both, _source

U = 2.0**-24

# (name, op, x shape, K, N, bias, per-channel, activation type, weight zero points)
CASES = [
    ("gemm_tb_i32bias_pc", "gemm_tb", (3, 40), 40, 13, "int32", True, "int8", False),
    ("gemm_tb_fbias_pt", "gemm_tb", (1, 70), 70, 9, "float", False, "int8", False),
    ("gemm_nt_nobias_pc_u8", "gemm_nt", (2, 33), 33, 7, None, True, "uint8", False),
    ("gemm_tb_u8w_zp", "gemm_tb", (1, 50), 50, 11, "int32", True, "uint8", True),
    ("matmul_3d_pc", "matmul", (2, 15, 33), 33, 9, None, True, "int8", False),
    ("matmul_fbias_pt_u8", "matmul", (1, 64), 64, 10, "float", False, "uint8", False),
    ("conv1x1_head", "conv1x1", (1, 24, 1, 1), 24, 10, "int32", True, "int8", False),
    ("conv3x3_float_out", "conv3x3", (1, 3, 6, 5), 27, 4, "float", True, "int8", False),
]


def _layer(case, rng, zeros: float = 0.0):
    """A one-layer QDQ model: x -> Q -> DQ -> op(DQ(w_q)) [+ bias] -> y (float), and the
    integer data the bound needs: (model, w_q - zw as [N][K] int64, sc, float bias)."""
    _, op, shape, k, n, bias, per_channel, act, wzp = case
    adt = np.uint8 if act == "uint8" else np.int8
    zx = 131 if adt == np.uint8 else 3
    sx = np.float32(0.037)
    wf = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    wf[rng.random((n, k)) < zeros] = 0
    if wzp:  # uint8 weights with per-channel zero points (an activation type of uint8)
        wdt, zw = np.uint8, rng.integers(110, 140, n)
    else:
        wdt, zw = np.int8, np.zeros(n, np.int64)
    sw = (np.abs(wf).max(1) / 127 + 1e-3).astype(np.float32)
    if not per_channel:
        sw[:] = sw.max()
        zw[:] = zw[0]
    info = np.iinfo(wdt)
    wq = np.clip(np.round(wf / sw[:, None]) + zw[:, None], info.min, info.max).astype(wdt)
    wq[wf == 0] = zw[np.nonzero(wf == 0)[0]].astype(wdt)  # exact zeros stay zero
    wint = wq.astype(np.int64) - zw[:, None]
    sc = (sx * sw).astype(np.float32)
    if per_channel:
        sw_i, zw_i = sw, zw.astype(wdt)
    else:
        sw_i, zw_i = sw[:1].reshape(()), zw[:1].reshape(()).astype(wdt)
    axis = {"gemm_tb": 0, "gemm_nt": 1, "matmul": 1, "conv1x1": 0, "conv3x3": 0}[op]
    if op in ("gemm_nt", "matmul"):
        wstore = np.ascontiguousarray(wq.T)
    elif op == "conv1x1":
        wstore = wq.reshape(n, k, 1, 1)
    elif op == "conv3x3":
        wstore = wq.reshape(n, 3, 3, 3)
    else:
        wstore = wq
    inits = [
        numpy_helper.from_array(wstore, "wq"),
        numpy_helper.from_array(np.asarray(sw_i, np.float32), "sw"),
        numpy_helper.from_array(np.asarray(zw_i), "zw"),
        numpy_helper.from_array(np.array(sx, np.float32), "sx"),
        numpy_helper.from_array(np.array(zx, adt), "zx"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], axis=axis),
    ]
    fb = np.zeros(n, np.float32)
    b_in = []
    if bias == "int32":
        bq = rng.integers(-3000, 3000, n).astype(np.int32)
        inits += [
            numpy_helper.from_array(bq, "bq"),
            numpy_helper.from_array(sc, "bs"),
            numpy_helper.from_array(np.zeros(n, np.int32), "bz"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"], axis=0))
        fb = (bq * sc).astype(np.float32)
        b_in = ["b"]
    elif bias == "float":
        fb = rng.standard_normal(n).astype(np.float32)
        inits.append(numpy_helper.from_array(fb, "b"))
        b_in = ["b"]
    if op.startswith("gemm"):
        nodes.append(
            helper.make_node("Gemm", ["xf", "w", *b_in], ["y"], transB=int(op == "gemm_tb"))
        )
    elif op == "matmul":
        nodes.append(helper.make_node("MatMul", ["xf", "w"], ["y" if not b_in else "mm"]))
        if b_in:
            nodes.append(helper.make_node("Add", ["mm", "b"], ["y"]))
    else:
        pads = [1, 1, 1, 1] if op == "conv3x3" else [0, 0, 0, 0]
        nodes.append(helper.make_node("Conv", ["xf", "w", *b_in], ["y"], pads=pads))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, case[0], [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return model, wint, sc, fb, (zx, adt, sx)


def _tolerance(case, x, wint, sc, fb, y, act):
    """``TOL`` of the module docstring, per output element."""
    _, op, shape, k, n = case[:5]
    zx, adt, sx = act
    info = np.iinfo(adt)
    xq = np.clip(np.rint(x / sx) + zx, info.min, info.max).astype(np.int64) - zx
    if op == "conv3x3":  # A[m][p] over the 3x3 window (zero padding contributes nothing)
        xp = np.pad(np.abs(xq[0]), ((0, 0), (1, 1), (1, 1)))
        h, w = shape[2:]
        cols = np.stack(
            [xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], 1
        ).reshape(k, h * w)
        a = (np.abs(wint) @ cols).reshape(1, n, h, w)
        bshape = (1, n, 1, 1)
    else:
        a = np.abs(xq).reshape(-1, k) @ np.abs(wint).T  # [rows][N]
        a = a.reshape(1, n, 1, 1) if op == "conv1x1" else a.reshape(*shape[:-1], n)
        bshape = (1, n, 1, 1) if op == "conv1x1" else (n,)
    scb, fbb = sc.reshape(bshape), fb.reshape(bshape)
    return (2 * k + 8) * U * scb * a + 2 * U * (np.abs(fbb) + np.abs(y)) + 1e-30


def _float_weight_sizes(cm) -> list[int]:
    """Sizes of the float constant arrays in the emitted weights file."""
    d = cm.path.parent / cm.name if (cm.path.parent / cm.name).exists() else cm.path.parent
    text = (d / f"{cm.name}_weights.c").read_text()
    return [int(s) for s in re.findall(r"const float \w+\[(\d+)\]", text)]


def _int8_weight_sizes(cm) -> list[int]:
    d = cm.path.parent / cm.name if (cm.path.parent / cm.name).exists() else cm.path.parent
    text = (d / f"{cm.name}_weights.c").read_text()
    return [int(s) for s in re.findall(r"const u?int(?:8|16)_t \w+\[(\d+)\]", text)]


def _ort(model, x, reference: bool):
    so = ort.SessionOptions()
    if reference:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("zeros", [0.0, 0.9], ids=["dense", "sparse90"])
def test_float_output_layers_are_integer_and_match_ort(zeros):
    rng = np.random.default_rng(11 if zeros else 10)
    models = {f"m{i}": _layer(case, rng, zeros) for i, case in enumerate(CASES)}
    built = _both({k: v[0] for k, v in models.items()}, "int8-gemm")
    for i, case in enumerate(CASES):
        model, wint, sc, fb, act = models[f"m{i}"]
        spec, gen = built[f"m{i}"]
        ops = spec.report["op_counts"]
        lowered = "QConvFloat_i8" if case[1] == "conv3x3" else "QFcFloat_i8"
        assert ops.get(lowered) == 1, (case, ops)
        assert not {"Gemm", "MatMul", "Conv", "DequantizeLinear"} & set(ops), (case, ops)
        n, k = case[4], case[3]
        # the weights are integers in the emitted C: no float array holds N*K values
        assert max(_float_weight_sizes(spec), default=0) < n * k, case
        layers = spec.report["sparse_layers"]
        if zeros:
            assert len(layers) == 1 and layers[0]["weights"] == n * k, case
            assert layers[0]["bytes"] < 0.3 * layers[0]["dense_bytes"], case
        else:
            assert not layers and sum(_int8_weight_sizes(spec)) >= n * k, case
            if case[1] != "conv3x3":
                assert "gp_q8fc_" in _source(spec) and "gp_qfc_" in _source(gen), case
        for _ in range(3):
            x = rng.uniform(-4, 4, case[2]).astype(np.float32)
            (a,), (b,) = spec.run(x), gen.run(x)
            np.testing.assert_array_equal(a, b, err_msg=str(case))  # kernels agree exactly
            # ORT's fused u8 x s8 kernels are exact only with VNNI (see test_c_int8)
            for reference in (True, False) if cpu_int8().vnni else (True,):
                o = _ort(model, x, reference)
                tol = _tolerance(case, x, wint, sc, fb, o, act)
                err = np.abs(a - o)
                assert (err <= tol).all(), (case, reference, float((err / tol).max()))
                if not reference and not case[1].startswith("conv") and case[5] != "float":
                    # ORT fuses these into QGemm / MatMulIntegerToFloat: the same floats
                    np.testing.assert_array_equal(a, o, err_msg=str(case))


def test_sparse_and_dense_float_output_are_bit_exact():
    """The sparse kernel stores the classifier as (gap, int8) entries and gives the dense
    kernel's floats bit for bit (the same int32 sums, the same output stage)."""
    rng = np.random.default_rng(3)
    case = ("big", "gemm_tb", (2, 300), 300, 40, "int32", True, "int8", False)
    model, *_ = _layer(case, rng, 0.9)
    dense, sparse = build(model, sparse=False, flags=FLAGS), build(model, flags=FLAGS)
    assert not dense.report["sparse_layers"] and len(sparse.report["sparse_layers"]) == 1
    assert sparse.weight_bytes < 0.5 * dense.weight_bytes
    for _ in range(4):
        x = rng.uniform(-4, 4, case[2]).astype(np.float32)
        np.testing.assert_array_equal(sparse.run(x)[0], dense.run(x)[0])


def test_simd_build_equals_the_portable_one():
    rng = np.random.default_rng(4)
    models = {f"m{i}": _layer(c, rng)[0] for i, c in enumerate(CASES)}
    portable = build_many(models, flags=FLAGS)
    simd = build_many(models, flags=(*FLAGS, "-DGP_SIMD"))
    for i, case in enumerate(CASES):
        x = rng.uniform(-4, 4, case[2]).astype(np.float32)
        np.testing.assert_array_equal(simd[f"m{i}"].run(x)[0], portable[f"m{i}"].run(x)[0])


def test_weights_quantized_along_k_stay_float_and_say_so():
    """Per-channel weights along the reduction axis cannot be factored out of the int32 sum:
    the layer keeps its float path, and the program's notes name it."""
    rng = np.random.default_rng(5)
    case = ("matmul_k_axis", "matmul", (1, 20), 20, 6, None, True, "int8", False)
    model, *_ = _layer(case, rng)
    k = 20
    for init in model.graph.initializer:  # per-channel along K (axis 0 of B [K][N])
        if init.name == "sw":
            init.CopyFrom(numpy_helper.from_array(np.full(k, 0.01, np.float32), "sw"))
        if init.name == "zw":
            init.CopyFrom(numpy_helper.from_array(np.zeros(k, np.int8), "zw"))
    for node in model.graph.node:
        if node.output[0] == "w":
            node.attribute[0].i = 0
    prog = compile_program(model)
    assert [n.op for n in prog.nodes if n.op == "MatMul"] == ["MatMul"]
    assert any("MatMul_3" in note or "axis 0" in note for note in prog.notes), prog.notes
    cm = build(model)
    x = rng.uniform(-4, 4, (1, 20)).astype(np.float32)
    o = _ort(model, x, True)
    assert np.abs(cm.run(x)[0] - o).max() <= 1e-5 * max(1.0, float(np.abs(o).max()))


# -- whole classifiers -------------------------------------------------------------------------
class _Net(torch.nn.Module):
    """A small conv net whose classifier holds most weights (8*8*8 = 512 -> ``out``)."""

    def __init__(self, out: int = 120):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(8 * 8 * 8, out)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def _calib(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 1, 16, 16, generator=g) for _ in range(n)]


def _fc_tolerance(prog_fc, y):
    """``TOL`` with ``A[n] <= 255 sum_k |w_q - zw|`` (the classifier's input is internal) and
    one step of that input allowed to differ (the float reference quantizes it from a float
    conv): ``+ sc[n] sum_k |w_q - zw|``."""
    e = prog_fc.extra
    w = np.abs(e["w"].astype(np.int64)).sum(1)
    k = e["w"].shape[1]
    return (2 * k + 8) * U * e["sc"] * 255 * w + e["sc"] * w + 2 * U * np.abs(y) + 1e-6


def _last_fc(path):
    prog = compile_program(str(path))
    (fc,) = [n for n in prog.nodes if n.op == "QFcFloat_i8"]
    return prog, fc


def test_graphopt_qdq_classifier(tmp_path):
    torch.manual_seed(0)
    model = _Net().eval()
    xs = _calib(24)
    g = graphopt.trace(model, (xs[0],))
    result = graphopt.Pipeline.parse("fold-bn,qdq").run(g, data=[torch.cat(xs[:16])])
    path = export(result.graph, tmp_path / "gq.onnx", dynamic_batch=False)
    cm = build(path)
    ops = cm.report["op_counts"]
    assert ops.get("QFcFloat_i8") == 1 and "Gemm" not in ops and "MatMul" not in ops, ops
    assert max(_float_weight_sizes(cm)) < 512 * 120
    prog, fc = _last_fc(path)
    assert fc.extra["w"].dtype == np.int8 and fc.extra["w"].shape == (120, 512)
    sess = ort.InferenceSession(str(path))
    for x in xs[16:]:
        x = x.numpy()
        (c,) = cm.run(x)
        o = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        assert (np.abs(c - o) <= _fc_tolerance(fc, o)).all()
        assert c.argmax() == o.argmax()


def _quantize_static(src, dst, per_channel):
    return ort_quantize_static(
        src,
        dst,
        _calib(16, seed=1),
        per_channel=per_channel,
        extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]},
    )


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_quantize_static_classifier(tmp_path, per_channel):
    torch.manual_seed(1)
    model = _Net().eval()
    xs = _calib(8, seed=2)
    src = export(graphopt.trace(model, (xs[0],)), tmp_path / "f.onnx", dynamic_batch=False)
    path = _quantize_static(src, tmp_path / "q.onnx", per_channel)
    last = [n for n in onnx.load(str(path)).graph.node if n.output[0] == "output"]
    assert last and last[0].op_type == "Gemm"  # float output: no QuantizeLinear after it
    cm, fp32 = build(path), build(src)
    ops = cm.report["op_counts"]
    assert ops.get("QFcFloat_i8") == 1 and "Gemm" not in ops, ops
    assert max(_float_weight_sizes(cm)) < 512 * 120
    # the classifier is 61k of the 62k weights: const bytes about 1/4 of fp32
    assert cm.weight_bytes <= 0.27 * fp32.weight_bytes, (cm.weight_bytes, fp32.weight_bytes)
    prog, fc = _last_fc(path)
    assert (fc.extra["bias"] is not None) and fc.extra["fb"] is None  # int32 bias in acc
    refs = [True, False] if cpu_int8().vnni else [True]
    for reference in refs:
        sess = session(path, reference=reference)
        for x in xs:
            x = x.numpy()
            (c,) = cm.run(x)
            o = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            assert (np.abs(c - o) <= _fc_tolerance(fc, o)).all(), reference
            assert c.argmax() == o.argmax()


@pytest.mark.parametrize("which", ["gemm_dense", "gemm_sparse", "conv3x3"])
def test_float_output_kernels_asan_ubsan_clean(tmp_path, which):
    from graphopt.backends.c import emit
    from graphopt.backends.c.build import find_compiler

    from .test_c_models import _sanitizer_works, run_sanitized

    cc = find_compiler()
    if not _sanitizer_works(cc, tmp_path):
        pytest.skip("the compiler's AddressSanitizer/UBSan runtime is not available")
    rng = np.random.default_rng(8)
    case = CASES[-1] if which == "conv3x3" else CASES[0]
    model, *_ = _layer(case, rng, 0.9 if which == "gemm_sparse" else 0.0)
    report = emit(model, tmp_path, name="net")
    assert bool(report["sparse_layers"]) == (which == "gemm_sparse")
    x = rng.uniform(-4, 4, case[2]).astype(np.float32)
    got = run_sanitized(cc, tmp_path, x)
    np.testing.assert_array_equal(got, build(model).run(x)[0].reshape(-1))
