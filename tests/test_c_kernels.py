"""The constant-weight kernels (packed convolution, 1x1 pointwise GEMM, repacked Gemm, folded
BatchNorm, fused activations) on geometries the ONNX node tests do not reach, against ORT.
All models compile into one library."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.c import build_many

# (C, H, W, M, kernel, stride, pad (t, l, b, r), dilation, group, activation)
CONVS = [
    (3, 9, 11, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, None),
    (5, 12, 12, 40, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, "Relu"),
    (16, 10, 12, 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, "Clip"),  # pointwise
    (7, 2, 3, 33, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, None),  # tiny image, m tail
    (8, 13, 7, 16, (5, 3), (2, 1), (2, 0, 1, 1), (1, 2), 1, "Relu"),
    (12, 8, 8, 36, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3, None),  # grouped
    (6, 8, 8, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6, "Clip"),  # depthwise
    (4, 9, 9, 8, (3, 3), (2, 2), (0, 0, 0, 0), (2, 2), 2, None),
    (3, 16, 16, 64, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1, "Relu"),
    (32, 1, 100, 12, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, None),  # pointwise, 1 row
    (20, 9, 9, 70, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, None),  # strided 1x1
]


def _conv_model(i, cfg, rng, *, bias=True, batch=2, clip_hi=1.5):
    """A Conv (random weights, and a bias if ``bias``) with an optional Relu or Clip(-0.5,
    ``clip_hi``) after it, on a ``[batch, C, H, W]`` input."""
    c, h, w, m, k, s, p, d, g, act = cfg
    inits = [numpy_helper.from_array(rng.standard_normal((m, c // g, *k)).astype(np.float32), "w")]
    ins = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "b"))
        ins.append("b")
    attrs = dict(kernel_shape=list(k), strides=list(s), pads=list(p), dilations=list(d))
    nodes = [helper.make_node("Conv", ins, ["c" if act else "y"], group=g, **attrs)]
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    elif act == "Clip":
        inits += [
            numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
            numpy_helper.from_array(np.array(clip_hi, np.float32), "hi"),
        ]
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
    graph = helper.make_graph(
        nodes,
        f"conv{i}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gemm_model(i, m, k, n, trans_b, with_c, const_b, rng):
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])]
    inits = []
    if const_b:
        inits.append(numpy_helper.from_array(b, "b"))
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b.shape)))
    names = ["a", "b"]
    if with_c:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "c"))
        names.append("c")
    node = helper.make_node("Gemm", names, ["y"], transB=trans_b, alpha=0.5, beta=2.0)
    graph = helper.make_graph(
        [node],
        f"gemm{i}",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), b


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString()).run(None, feeds)


@pytest.fixture(scope="module")
def built():
    rng = np.random.default_rng(0)
    models, feeds = {}, {}
    for i, cfg in enumerate(CONVS):
        models[f"conv{i}"] = _conv_model(i, cfg, rng)
        c, h, w = cfg[:3]
        feeds[f"conv{i}"] = {"x": rng.standard_normal((2, c, h, w)).astype(np.float32)}
    for i, (m, k, n, tb, wc, cb) in enumerate(
        [(1, 40, 30, 1, 1, 1), (3, 17, 9, 0, 1, 1), (2, 8, 5, 1, 0, 0), (4, 6, 7, 0, 1, 0)]
    ):
        model, b = _gemm_model(i, m, k, n, tb, wc, cb, rng)
        models[f"gemm{i}"] = model
        feeds[f"gemm{i}"] = {"a": rng.standard_normal((m, k)).astype(np.float32)}
        if not cb:
            feeds[f"gemm{i}"]["b"] = b
    return models, feeds, build_many(models)


@pytest.mark.parametrize(
    "name", [f"conv{i}" for i in range(len(CONVS))] + ["gemm0", "gemm1", "gemm2", "gemm3"]
)
def test_kernel_matches_ort(built, name):
    models, feeds, libs = built
    cm = libs[name]
    assert not isinstance(cm, Exception), cm
    (ref,) = _ort(models[name], feeds[name])
    (got,) = cm.run(*feeds[name].values())
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
