"""Products of two quantized activations in C (attention's ``q kᵀ`` and ``p v``).

``DQ(a), DQ(b) -> MatMul -> Q`` lowers to ``QMatMul_i8`` (QLinearMatMul) and
``DQ(a), DQ(b) -> MatMul`` with a float result to ``QMatMulFloat_i8`` (MatMulIntegerToFloat):
int32 accumulation of ``(a - za)(b - zb)``, then ``float(acc) * fl32(fl32(sa sb) / sy)``
rounded half to even and saturated, or ``float(acc) * fl32(sa sb)``, as ONNX Runtime's kernels
compute them (:mod:`graphopt.backends.c.matmul_q8`).

Checked bit for bit against ORT's operator kernels (``QLinearMatMul``, ``MatMulIntegerToFloat``
with graph optimisations off) where ORT has them for the types, against a numpy float32
statement of the same formula everywhere, against ``onnx.reference`` (its QLinearMatMul scales the
accumulator in float64 and adds the zero point before rounding: equal except where
``acc * scale`` lies within a float32 rounding of a half), against the QDQ graph's own operator
definitions where its float ops are exact (power-of-two scales, with ties) and against ORT's fused result of the QDQ graph itself; then on a quantized
``nn.TransformerEncoder`` stack: no float MatMul left, outputs within the bound of
``tests/test_qdq_transformer.py``, and clean under AddressSanitizer/UBSan."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from graphopt.backends import onnxruntime as gort
from graphopt.backends.c import build, compile_program, emit
from graphopt.backends.c.build import find_compiler

from .test_c_models import _sanitizer_works, run_sanitized
from .test_qdq_transformer import Encoders, _float_logit_bound, _quantize

_T = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8}
_I8, _U8 = np.dtype(np.int8), np.dtype(np.uint8)

# (name, A dtype, B dtype, A shape, B shape, output dtype or None for float)
CASES = [
    ("u8u8_4d_bcast", _U8, _U8, (2, 3, 5, 7), (3, 7, 9), _U8),
    ("u8s8_3d", _U8, _I8, (4, 13, 31), (4, 31, 6), _U8),
    ("s8s8_4d_bcast_a", _I8, _I8, (1, 3, 5, 17), (2, 3, 17, 11), _I8),
    ("s8u8_3d_bcast_b", _I8, _U8, (3, 9, 33), (1, 33, 5), _I8),
    ("u8u8_2d_wide", _U8, _U8, (3, 40), (40, 300), _U8),  # N > one row block of 256
    ("u8u8_float_4d", _U8, _U8, (1, 4, 6, 8), (1, 4, 8, 6), None),
    ("u8s8_float_3d", _U8, _I8, (2, 11, 19), (2, 19, 7), None),
    ("s8s8_float_4d_bcast", _I8, _I8, (2, 1, 5, 23), (3, 23, 9), None),
    ("s8u8_float_2d", _I8, _U8, (7, 29), (29, 13), None),
]


def _qparams(dt, rng, scale):
    lo, hi = np.iinfo(dt).min, np.iinfo(dt).max
    z = int(rng.integers(lo + 20, hi - 20))  # a nonzero zero point, off the middle
    return np.float32(scale * (1 + rng.random())), z


def _case(case, seed=0):
    """Integer inputs and the quantization parameters of one case."""
    _, adt, bdt, ashape, bshape, ydt = case
    rng = np.random.default_rng(seed)
    a = rng.integers(np.iinfo(adt).min, np.iinfo(adt).max + 1, ashape).astype(adt)
    b = rng.integers(np.iinfo(bdt).min, np.iinfo(bdt).max + 1, bshape).astype(bdt)
    sa, za = _qparams(adt, rng, 0.01)
    sb, zb = _qparams(bdt, rng, 0.02)
    p = dict(sa=sa, za=np.array(za, adt), sb=sb, zb=np.array(zb, bdt))
    if ydt is not None:
        k = ashape[-1]
        # a scale that spreads the products over the output range, so both clamps happen
        sy, zy = _qparams(ydt, rng, float(sa * sb) * 255 * 255 * np.sqrt(k) / 400)
        p.update(sy=sy, zy=np.array(zy, ydt))
    return a, b, p


def _inits(p):
    return [numpy_helper.from_array(np.asarray(v), k) for k, v in p.items()]


def _model(case, p, fused: bool) -> onnx.ModelProto:
    """The QDQ graph ``DQ(a), DQ(b) -> MatMul [-> Q]`` or (``fused``) its one-op form
    ``QLinearMatMul`` / ``com.microsoft.MatMulIntegerToFloat``."""
    _, adt, bdt, ashape, bshape, ydt = case
    ins = [
        helper.make_tensor_value_info("a", _T[adt], ashape),
        helper.make_tensor_value_info("b", _T[bdt], bshape),
    ]
    out_t = TensorProto.FLOAT if ydt is None else _T[ydt]
    outs = [helper.make_tensor_value_info("y", out_t, None)]
    if fused and ydt is not None:
        nodes = [
            helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"])
        ]
    elif fused:
        nodes = [
            helper.make_node(
                "MatMulIntegerToFloat",
                ["a", "b", "sa", "sb", "za", "zb"],
                ["y"],
                domain="com.microsoft",
            )
        ]
    else:
        nodes = [
            helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
            helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
            helper.make_node("MatMul", ["fa", "fb"], ["m" if ydt is not None else "y"]),
        ]
        if ydt is not None:
            nodes.append(helper.make_node("QuantizeLinear", ["m", "sy", "zy"], ["y"]))
    opsets = [helper.make_opsetid("", 19), helper.make_opsetid("com.microsoft", 1)]
    m = helper.make_model(
        helper.make_graph(nodes, "qmm", ins, outs, _inits(p)), opset_imports=opsets
    )
    m.ir_version = 9
    return m


def _ort(model, feeds, optimise: bool):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if not optimise:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def _acc(a, b, p):
    return np.matmul(a.astype(np.int64) - int(p["za"]), b.astype(np.int64) - int(p["zb"]))


def _formula(a, b, p):
    """ORT's kernels in numpy float32: the C kernels' statement of the operator."""
    acc = _acc(a, b, p)
    assert np.abs(acc).max() < 2**31
    sab = np.float32(p["sa"]) * np.float32(p["sb"])
    f = acc.astype(np.int32).astype(np.float32)
    if "sy" not in p:
        return f * sab
    sc = np.float32(sab / np.float32(p["sy"]))
    zy, info = int(p["zy"]), np.iinfo(p["zy"].dtype)
    v = np.clip(f * sc, np.float32(info.min - zy), np.float32(info.max - zy))
    return (np.rint(v).astype(np.int32) + zy).astype(p["zy"].dtype)


def _ort_has_kernel(case) -> bool:
    """ORT's CPU kernels: QLinearMatMul u8 x (u8|s8) -> u8 and s8 x s8 -> s8;
    MatMulIntegerToFloat (u8|s8) x (u8|s8) with A and B both signed or A unsigned."""
    _, adt, bdt, _, _, ydt = case
    return not (adt == _I8 and bdt == _U8)


@pytest.fixture(scope="module")
def built():
    """Every case compiled once (one shared library each)."""
    out = {}
    for case in CASES:
        _, _, p = _case(case)
        model = _model(case, p, fused=False)
        out[case[0]] = (build(model, name=f"qmm_{case[0]}"), model)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lowered_to_integer_kernel(case, built):
    cm, _ = built[case[0]]
    ops = cm.report["op_counts"]
    want = "QMatMul_i8" if case[5] is not None else "QMatMulFloat_i8"
    assert ops == {want: 1}, ops
    assert not cm.report["notes"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bit_exact_with_the_operator(case, built, tmp_path):
    cm, model = built[case[0]]
    a, b, p = _case(case)
    got = cm.run(a, b)[0]
    want = _formula(a, b, p)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if _ort_has_kernel(case):  # ORT's operator kernel, graph optimisations off
        np.testing.assert_array_equal(got, _ort(_model(case, p, True), {"a": a, "b": b}, False))
    # more inputs through the same library (scales fixed in the code)
    for seed in (1, 2):
        a2, b2, _ = _case(case, seed)
        np.testing.assert_array_equal(cm.run(a2, b2)[0], _formula(a2, b2, p))


@pytest.mark.parametrize("case", [c for c in CASES if c[5] is not None], ids=lambda c: c[0])
def test_onnx_reference_differs_only_at_float32_rounding_of_a_half(case, built):
    """``onnx.reference``'s QLinearMatMul scales the accumulator in float64 (and adds the zero
    point before rounding: see the ties test); away from halves it agrees."""
    cm, _ = built[case[0]]
    a, b, p = _case(case)
    got = cm.run(a, b)[0]
    ref = ReferenceEvaluator(_model(case, p, True)).run(None, {"a": a, "b": b})[0]
    diff = got.astype(np.int32) != ref.astype(np.int32)
    assert np.abs(got.astype(np.int32) - ref.astype(np.int32)).max(initial=0) <= 1
    if diff.any():
        sc = np.float32(np.float32(p["sa"]) * np.float32(p["sb"]) / np.float32(p["sy"]))
        exact = _acc(a, b, p)[diff] * float(sc)
        half = np.abs(exact - np.floor(exact) - 0.5)
        assert (half <= 2.0**-23 * np.abs(exact)).all(), half
    assert diff.mean() < 0.01


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_ort_on_the_qdq_graph(case, built):
    """ORT fuses the QDQ graph into the same kernel (bit for bit) where it has one; where it
    does not (s8 x u8, and s8 x s8 -> float), it runs the float ops: one step, or the float32
    rounding of ``K`` sums, off."""
    cm, model = built[case[0]]
    a, b, p = _case(case)
    got = cm.run(a, b)[0]
    ort_y = _ort(model, {"a": a, "b": b}, True)
    if case[5] is not None:
        d = np.abs(got.astype(np.int32) - ort_y.astype(np.int32))
        assert d.max() <= (0 if _ort_has_kernel(case) and case[1] == _U8 else 1)
    else:
        k = case[3][-1]
        sab = float(np.float32(p["sa"]) * np.float32(p["sb"]))
        bound = (2 * k + 8) * 2.0**-24 * sab * np.abs(_acc(a, b, p)).max() + 1e-30
        assert np.abs(got - ort_y).max() <= bound


@pytest.mark.parametrize("ydt", [_U8, _I8], ids=["u8", "s8"])
def test_ties_round_half_to_even(ydt):
    """Power-of-two scales (``sc = 1/2``): every odd accumulator is an exact half, which the
    operator rounds to even (``roundf`` would take it away from zero)."""
    adt = bdt = ydt
    case = ("ties", adt, bdt, (2, 9, 12), (2, 12, 10), ydt)
    z = 0 if ydt == _I8 else 128
    rng = np.random.default_rng(5)
    a = (rng.integers(-8, 9, case[3]) + z + 3).astype(adt)
    b = (rng.integers(-8, 9, case[4]) + z - 2).astype(bdt)
    p = dict(sa=np.float32(0.5), za=np.array(z + 3, adt), sb=np.float32(0.25))
    p.update(zb=np.array(z - 2, bdt), sy=np.float32(0.25), zy=np.array(z + 1, ydt))
    v = _acc(a, b, p) / 2.0
    assert (v - np.floor(v) == 0.5).sum() >= 50  # halves to round
    cm = build(_model(case, p, fused=False), name=f"qmm_ties_{ydt.name}")
    got = cm.run(a, b)[0]
    np.testing.assert_array_equal(got, _formula(a, b, p))
    np.testing.assert_array_equal(got, _ort(_model(case, p, True), {"a": a, "b": b}, False))
    # with these scales the QDQ graph's float ops are exact too: its operator definitions
    # (DequantizeLinear, MatMul, QuantizeLinear: round half to even, then add the zero point)
    qdq = _model(case, p, fused=False)
    np.testing.assert_array_equal(got, ReferenceEvaluator(qdq).run(None, {"a": a, "b": b})[0])
    np.testing.assert_array_equal(got, _ort(qdq, {"a": a, "b": b}, False))
    # onnx.reference's QLinearMatMul adds the (odd) zero point before it rounds: the halves
    # go the other way there, and only they
    ref = ReferenceEvaluator(_model(case, p, True)).run(None, {"a": a, "b": b})[0]
    diff = got != ref
    assert diff.any() and (v[diff] - np.floor(v[diff]) == 0.5).all()


def _notes(model) -> tuple[collections.Counter, list[str]]:
    prog = compile_program(model)
    return collections.Counter(n.op for n in prog.nodes), prog.notes


def test_per_channel_operand_stays_float_with_a_note():
    case = ("pc", _U8, _U8, (2, 5, 7), (2, 7, 4), _U8)
    a, b, p = _case(case)
    model = _model(case, p, fused=False)
    dq = model.graph.node[1]
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "sb"))
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "zb"))
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.full(4, 0.02, np.float32), "sb"),
            numpy_helper.from_array(np.full(4, 128, np.uint8), "zb"),
        ]
    )
    dq.attribute.append(helper.make_attribute("axis", -1))
    ops, notes = _notes(model)
    assert ops["MatMul"] == 1 and "QMatMul_i8" not in ops
    assert any("per channel" in n and "stays float" in n for n in notes), notes


def test_possible_overflow_stays_float_with_a_note():
    case = ("deep", _U8, _U8, (1, 100000), (100000, 2), None)
    _, _, p = _case(case)
    ops, notes = _notes(_model(case, p, fused=False))
    assert ops["MatMul"] == 1 and "QMatMulFloat_i8" not in ops
    assert any("overflow" in n for n in notes), notes


def test_relu_before_the_quantize_is_folded_into_the_clamp():
    case = ("relu", _U8, _I8, (2, 6, 10), (2, 10, 5), _U8)
    a, b, p = _case(case)
    model = _model(case, p, fused=False)
    model.graph.node[2].output[0] = "mm"
    model.graph.node.insert(3, helper.make_node("Relu", ["mm"], ["m"]))
    cm = build(model, name="qmm_relu")
    assert cm.report["op_counts"] == {"QMatMul_i8": 1}
    want = np.maximum(_formula(a, b, p), p["zy"])
    np.testing.assert_array_equal(cm.run(a, b)[0], want)


# -- a quantized transformer ---------------------------------------------------------------
@pytest.fixture(scope="module")
def encoders_q(tmp_path_factory):
    torch.manual_seed(0)
    model = Encoders().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 6, 8, generator=g) for _ in range(4)]
    result = _quantize(model, (data[0][:2],), data)
    path = gort.export(result.graph, tmp_path_factory.mktemp("encq") / "encoders_q.onnx")
    return result, path


def test_encoder_products_are_integer_in_c(encoders_q, tmp_path):
    result, path = encoders_q
    cm = build(path, name="enc_qmm")
    ops = cm.report["op_counts"]
    assert "MatMul" not in ops and "Gemm" not in ops, ops
    assert ops["QMatMul_i8"] == 3 and ops["QMatMulFloat_i8"] == 3, ops  # p v, q kᵀ per layer
    assert not any("stays float" in n for n in cm.report["notes"]), cm.report["notes"]
    x = torch.randn(16, 6, 8, generator=torch.Generator().manual_seed(2)).numpy()
    got = gort.run(path, x)[0]
    c = np.concatenate([cm.run(x[i : i + 1])[0] for i in range(len(x))])
    bound = _float_logit_bound(result.graph.module, "fc")
    assert float(np.abs(c - got).max()) <= bound
    # most samples carry every int8 value through unchanged (float32-rounding level only)
    same = np.abs(c - got).max(axis=1) <= 1e-4 * float(np.abs(got).max())
    assert same.mean() >= 0.9, same.mean()


def test_encoder_asan_ubsan_clean(encoders_q, tmp_path):
    cc = find_compiler()
    if not _sanitizer_works(cc, tmp_path):
        pytest.skip("the compiler's AddressSanitizer/UBSan runtime is not available")
    _, path = encoders_q
    rep = emit(path, tmp_path, name="net")
    assert rep["op_counts"]["QMatMul_i8"] == 3
    x = np.random.default_rng(3).standard_normal((1, 6, 8)).astype(np.float32)
    got = run_sanitized(cc, tmp_path, x)
    cm = build(path, name="enc_qmm_ref")
    np.testing.assert_allclose(got, cm.run(x)[0].reshape(-1), rtol=0, atol=1e-5)
