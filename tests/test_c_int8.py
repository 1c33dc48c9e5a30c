"""int8: QDQ models lowered to integer kernels, against ORT's int8 execution.

digits:vgg quantized by ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8
weights; int8 and uint8 activations) and by graphopt's own ``fold-bn,qdq`` pipeline. The C
output must be within one quantization step of ORT's on >= 99.9% of the elements and give
the same top-1 on the whole digits test split; every Conv/Gemm must run as an integer kernel.

A model ORT's own quantizer writes has full-range int8 weights, which ORT's fused ``u8 x s8``
kernels cannot compute exactly on x86 without VNNI (:mod:`graphopt.cpu`). Such models are
compared with ORT running the operator definitions (``session(reference=True)``) on every CPU,
and with ORT's fused kernels only where those are exact (VNNI). graphopt's own models choose
weights ORT computes exactly, so they are compared with the fused kernels everywhere.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import graphopt
from graphopt.backends.c import build, emit
from graphopt.backends.c.build import find_compiler
from graphopt.backends.c.kernels_int8 import quantize_multiplier
from graphopt.backends.onnxruntime import export, ort_quantize_static, session
from graphopt.cpu import cpu_int8
from graphopt.zoo.digits import load_digits_data
from graphopt.zoo.models import load_model

from .test_c_models import _sanitizer_works, run_sanitized


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


@pytest.fixture(scope="module")
def float_vgg(tmp_path_factory):
    model, (x,) = load_model("digits:vgg")
    path = tmp_path_factory.mktemp("int8") / "vgg.onnx"
    export(graphopt.trace(model, (x,)), path, dynamic_batch=False)
    return path, model, x


def _quantize(src, dst, digits, activation):
    xs = digits.x_train.numpy()[:256]
    return ort_quantize_static(
        src, dst, [xs[i : i + 1] for i in range(len(xs))], activation=activation
    )


def _outputs(cm, sess, xs):
    name = sess.get_inputs()[0].name
    c = np.stack([cm.run(xs[i : i + 1])[0][0] for i in range(len(xs))])
    o = np.stack([sess.run(None, {name: xs[i : i + 1]})[0][0] for i in range(len(xs))])
    return c, o


def _output_scale(path):
    model = onnx.load(str(path))
    last = [n for n in model.graph.node if n.output[0] == model.graph.output[0].name][0]
    assert last.op_type == "DequantizeLinear"
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return float(inits[last.input[1]])


@pytest.mark.parametrize("activation", ["QInt8", "QUInt8"])
def test_quantize_static_model(float_vgg, digits, tmp_path, activation):
    from onnxruntime.quantization import QuantType

    path = _quantize(float_vgg[0], tmp_path / "q.onnx", digits, getattr(QuantType, activation))
    cm = build(path)
    ops = cm.report["op_counts"]
    assert ops.get("QConv_i8") == 4 and ops.get("QFc_i8") == 2, ops
    assert "Conv" not in ops and "Gemm" not in ops, ops
    xs = digits.x_test.numpy()
    for reference in (True, False) if cpu_int8().vnni else (True,):
        c, o = _outputs(cm, session(path, reference=reference), xs)
        steps = np.abs(c - o) / _output_scale(path)
        within = float((steps <= 1.0 + 1e-3).mean())
        agree = float((c.argmax(1) == o.argmax(1)).mean())
        print(
            f"{activation} vs ORT {'reference' if reference else 'fused'}: {within:.5f} of "
            f"outputs within one step (max {steps.max():.2f} steps); top-1 agreement "
            f"{agree:.4f} on {len(xs)} test images; weights {cm.weight_bytes} B, arena "
            f"{cm.arena_bytes} B"
        )
        assert within >= 0.999
        assert agree == 1.0


def test_graphopt_qdq_pass_model(float_vgg, digits, tmp_path):
    _, model, x = float_vgg
    g = graphopt.trace(model, (x,))
    batches = [digits.x_train[i : i + 64] for i in range(0, 512, 64)]
    result = graphopt.Pipeline.parse("fold-bn,qdq").run(g, data=batches)
    path = export(result.graph, tmp_path / "gq.onnx", dynamic_batch=False)
    cm = build(path)
    assert cm.report["op_counts"].get("QConv_i8") == 4, cm.report["op_counts"]
    # the last Gemm has no Q after it: int8 weights, float output (test_c_qgemm_float.py)
    assert cm.report["op_counts"].get("QFcFloat_i8") == 1, cm.report["op_counts"]
    sess = ort.InferenceSession(str(path))
    xs = digits.x_test.numpy()[:120]
    c, o = _outputs(cm, sess, xs)
    # compare logits relative to their range
    assert np.abs(c - o).max() <= 0.02 * (o.max() - o.min())
    assert (c.argmax(1) == o.argmax(1)).mean() >= 0.99


def test_quantize_multiplier():
    for m in [1e-6, 0.0123, 0.5, 0.999999, 1.0, 3.7, 1000.0]:
        qm, qs = quantize_multiplier(m)
        assert 2**30 <= qm < 2**31
        assert abs(qm * 2.0 ** -(31 + qs) - m) <= m * 2**-30
    assert quantize_multiplier(0.0) == (0, 0)


@pytest.mark.parametrize("which", ["digits:vgg", "tiny"])
def test_int8_asan_ubsan_clean(float_vgg, digits, tmp_path, which):
    cc = find_compiler()
    if not _sanitizer_works(cc, tmp_path):
        pytest.skip("the compiler's AddressSanitizer/UBSan runtime is not available")
    from onnxruntime.quantization import QuantType

    if which == "tiny":
        path, xs = _tiny_quantized(tmp_path)
        x = xs[0]
    else:
        path = _quantize(float_vgg[0], tmp_path / "q.onnx", digits, QuantType.QInt8)
        x = digits.x_test.numpy()[:1]
    emit(path, tmp_path, name="net")
    run_sanitized(cc, tmp_path, x)


class _Tiny(torch.nn.Module):
    """Depthwise, pointwise (wide enough for the pixel-vectorised kernel), residual add,
    average/max pooling, concat, global pool, linear: every int8 rule."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1), nn.ReLU(), nn.Conv2d(24, 16, 1))
        self.dw2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.avg = nn.AvgPool2d(2)
        self.max = nn.MaxPool2d(2)
        self.fc = nn.Linear(48, 7)

    def forward(self, x):
        a = self.dw(self.stem(x))
        b = torch.relu(a + self.pw(a))
        c = torch.cat([self.avg(b), self.max(b), self.dw2(b)], 1)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(c, 1), 1))


def _tiny_quantized(tmp_path):
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(1, 3, 12, 12)
    src = export(graphopt.trace(model, (x,)), tmp_path / "tiny.onnx", dynamic_batch=False)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(24)]
    return ort_quantize_static(src, tmp_path / "tiny_q.onnx", xs[:16]), xs


def test_int8_kernels_on_a_tiny_net(tmp_path):
    dst, xs = _tiny_quantized(tmp_path)
    cm = build(dst)
    ops = cm.report["op_counts"]
    assert ops.get("QRequant_i8") == 3, ops  # concat of three differently scaled inputs
    assert ops.get("QConv_i8") == 5 and ops.get("QAdd_i8") == 1 and ops.get("QFc_i8") == 1, ops
    for reference in (True, False) if cpu_int8().vnni else (True,):
        c, o = _outputs(cm, session(dst, reference=reference), np.concatenate(xs))
        steps = np.abs(c - o) / _output_scale(dst)
        assert (steps <= 1.0 + 1e-3).mean() >= 0.999, (reference, steps.max())


def _qdq_graph(op_nodes, x_shape, out_shape, tmp_path, name):
    """x -> Q -> DQ -> ops (reading 'xf', writing 'yf') -> Q -> DQ -> y, int8 scales fixed."""
    from onnx import TensorProto, helper

    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
        numpy_helper.from_array(np.array(3, np.int8), "zx"),
        numpy_helper.from_array(np.array(0.03, np.float32), "sy"),
        numpy_helper.from_array(np.array(-5, np.int8), "zy"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"]),
        *op_nodes,
        helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    "case",
    ["reduce_mean", "avgpool_pads", "avgpool_include_pad", "add_relu", "maxpool"],
)
def test_int8_rules_on_handmade_groups(case, tmp_path):
    from onnx import helper

    shape = (1, 3, 7, 6)
    if case == "reduce_mean":
        nodes = [helper.make_node("ReduceMean", ["xf", "axes"], ["yf"], keepdims=1)]
        out, lowered = (1, 3, 1, 1), "QAvgPool_i8"
    elif case.startswith("avgpool"):
        nodes = [
            helper.make_node(
                "AveragePool",
                ["xf"],
                ["yf"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                count_include_pad=int(case.endswith("include_pad")),
            )
        ]
        out, lowered = (1, 3, 4, 3), "QAvgPool_i8"
    elif case == "add_relu":
        nodes = [
            helper.make_node("Add", ["xf", "xf"], ["s"]),
            helper.make_node("Relu", ["s"], ["yf"]),
        ]
        out, lowered = shape, "QAdd_i8"
    else:
        nodes = [helper.make_node("MaxPool", ["xf"], ["yf"], kernel_shape=[2, 2])]
        out, lowered = (1, 3, 6, 5), "MaxPool"
    model = _qdq_graph(nodes, shape, out, tmp_path, case)
    cm = build(model, flags=("-O1",))
    assert lowered in cm.report["op_counts"], cm.report["op_counts"]
    if case == "maxpool":  # same scale in and out is required; here they differ: stays float
        assert cm.report["op_counts"].get("DequantizeLinear") == 2
    sess = ort.InferenceSession(model.SerializeToString())
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.uniform(-4, 4, shape).astype(np.float32)
        (got,) = cm.run(x)
        ref = sess.run(None, {"x": x})[0]
        assert (np.abs(got - ref) / 0.03 <= 1.0 + 1e-3).all()
