"""Sparse weight storage in the C backend: the encoding, and sparse kernels against dense ones
(float within 1e-5 relative, int8 exactly) and against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.c import build
from graphopt.backends.c import sparse as sp


def _sparse(rng, shape, zero_fraction, dtype=np.float32):
    if dtype == np.int8:
        w = rng.integers(-127, 128, size=shape).astype(np.int8)
        w[w == 0] = 1
    else:
        w = rng.standard_normal(shape).astype(dtype)
    w[rng.random(shape) < zero_fraction] = 0
    return w


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3000),
    st.floats(0.0, 0.999),
    st.sampled_from([4, 8]),
    st.integers(0, 2**31 - 1),
)
def test_encoding_round_trips(size, zero_fraction, bits, seed):
    rng = np.random.default_rng(seed)
    flat = _sparse(rng, (size,), zero_fraction)
    if rng.random() < 0.3:  # long runs of zeros: fillers
        flat[: size // 2] = 0
    enc = sp.encode(flat, bits)
    assert np.array_equal(sp.decode(enc, size), flat)
    assert enc.entries >= np.count_nonzero(flat)
    limit = (1 << bits) - 1
    fillers = enc.entries - np.count_nonzero(flat)
    assert fillers <= size // (limit + 1) + 1


def test_best_keeps_dense_layers_dense():
    rng = np.random.default_rng(0)
    assert sp.best(rng.standard_normal(1000).astype(np.float32)) is None
    assert sp.best(_sparse(rng, (1000,), 0.3)) is None  # not sparse enough
    enc = sp.best(_sparse(rng, (1000,), 0.9, np.int8))
    assert enc is not None and enc.nbytes < 1000


def _conv_model(w, stride, pad, dilation, group, x_shape, quantized, w_scale=None):
    m, _, kh, kw = w.shape
    n, c, h, wd = x_shape
    oh = (h + 2 * pad - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
    attrs = dict(strides=[stride, stride], pads=[pad] * 4, dilations=[dilation] * 2, group=group)
    inits, nodes = [], []
    if quantized:
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
            numpy_helper.from_array(np.array(7, np.uint8), "zx"),
            numpy_helper.from_array(np.array(0.04, np.float32), "sy"),
            numpy_helper.from_array(np.array(120, np.uint8), "zy"),
            numpy_helper.from_array(w, "wq"),
            numpy_helper.from_array(w_scale, "sw"),
            numpy_helper.from_array(np.zeros(m, np.int8), "zw"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"]),
            helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wf"], axis=0),
            helper.make_node("Conv", ["xf", "wf"], ["yf"], **attrs),
            helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"]),
        ]
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(helper.make_node("Conv", ["x", "w"], ["y"], **attrs))
    g = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, m, oh, ow])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


conv_cases = st.tuples(
    st.sampled_from([1, 3, 5]),  # kernel
    st.sampled_from([1, 2]),  # stride
    st.sampled_from([0, 1, 2]),  # pad
    st.sampled_from([1, 2]),  # dilation
    st.sampled_from([1, 2]),  # groups
    st.integers(1, 3),  # channels per group in
    st.integers(1, 3),  # channels per group out
    st.sampled_from([0.6, 0.9, 0.99]),
    st.integers(0, 2**31 - 1),
)


def _geometry_ok(k, d, pad, size):
    return size + 2 * pad - d * (k - 1) - 1 >= 0


@settings(max_examples=10, deadline=None)
@given(conv_cases)
def test_sparse_float_conv_equals_dense_and_ort(case):
    k, s, pad, d, g, cin, cout, zeros, seed = case
    rng = np.random.default_rng(seed)
    h = 9
    if not _geometry_ok(k, d, pad, h):
        return
    w = _sparse(rng, (g * cout, cin, k, k), zeros)
    w.reshape(-1)[0] = 1.0  # at least one non-zero
    model = _conv_model(w, s, pad, d, g, (1, g * cin, h, h), quantized=False)
    sparse_c, dense_c = build(model), build(model, sparse=False)
    assert sparse_c.report["sparse_layers"] or sp.best(w) is None
    x = rng.standard_normal((1, g * cin, h, h)).astype(np.float32)
    (a,), (b,) = sparse_c.run(x), dense_c.run(x)
    (o,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= 1e-5 * scale
    assert np.abs(a - o).max() <= 1e-4 * scale


@settings(max_examples=10, deadline=None)
@given(conv_cases)
def test_sparse_int8_conv_equals_dense_exactly(case):
    k, s, pad, d, g, cin, cout, zeros, seed = case
    rng = np.random.default_rng(seed)
    h = 9
    if not _geometry_ok(k, d, pad, h):
        return
    w = _sparse(rng, (g * cout, cin, k, k), zeros, np.int8)
    w.reshape(-1)[0] = 5
    w_scale = (rng.random(g * cout) * 0.01 + 0.001).astype(np.float32)
    model = _conv_model(w, s, pad, d, g, (1, g * cin, h, h), True, w_scale)
    sparse_c, dense_c = build(model), build(model, sparse=False)
    assert sparse_c.report["op_counts"] == dense_c.report["op_counts"]
    x = rng.standard_normal((1, g * cin, h, h)).astype(np.float32)
    (a,), (b,) = sparse_c.run(x), dense_c.run(x)
    assert np.array_equal(a, b)
    (o,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    assert np.abs(a - o).max() <= 0.04 + 1e-6  # one output quantization step


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 40), st.integers(1, 300), st.sampled_from([0.7, 0.95]), st.integers(0, 999))
def test_sparse_float_gemm_equals_dense(n_out, k, zeros, seed):
    rng = np.random.default_rng(seed)
    w = _sparse(rng, (n_out, k), zeros)
    w[0, 0] = 1.0
    b = rng.standard_normal(n_out).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=0.5)],
        "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n_out])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((2, k)).astype(np.float32)
    (a,), (c,) = build(model).run(x), build(model, sparse=False).run(x)
    (o,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    scale = max(1.0, float(np.abs(c).max()))
    assert np.abs(a - c).max() <= 1e-5 * scale and np.abs(a - o).max() <= 1e-4 * scale


@pytest.mark.slow
def test_digits_sparse_int8_flash_and_accuracy(tmp_path):
    """The issue's goal: at 90% sparsity + int8 the sparse layers take at most 1/20 of their
    fp32 dense bytes, the C model equals the dense C model exactly and ORT's top-1."""
    import torch

    import graphopt
    from graphopt.backends import onnxruntime as ob
    from graphopt.zoo.datasets import load_data
    from graphopt.zoo.models import load_model

    model, _ = load_model("digits:vgg")
    data = load_data("digits")
    result = graphopt.compress(
        model,
        "fold-bn,sparsify(sparsity=0.9),distill(epochs=3),qdq",
        example_inputs=(data.train[0][0][:8],),
        data=data.train,
    )
    path = ob.export(result.graph, tmp_path / "q.onnx")
    sparse_c, dense_c = build(path), build(path, sparse=False)
    layers = sparse_c.report["sparse_layers"]
    assert len(layers) == 4  # 3 convs and the hidden linear; first conv, classifier dense
    fp32 = sum(layer["weights"] * 4 for layer in layers)
    assert sum(layer["bytes"] for layer in layers) * 20 <= fp32
    assert sparse_c.weight_bytes < 0.5 * dense_c.weight_bytes
    sess = ob.session(path)
    x = torch.cat([xb for xb, _ in data.test]).numpy()
    for i in range(0, len(x), 7):
        (a,), (b,) = sparse_c.run(x[i : i + 1]), dense_c.run(x[i : i + 1])
        assert np.array_equal(a, b)
        assert a.argmax() == ob.run(sess, x[i : i + 1])[0].argmax()
