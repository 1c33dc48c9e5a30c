"""Hypothesis-generated small graphs of supported ops: the C backend agrees with ORT."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.c import build

UNARY = ["Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Clip"]


class _Builder:
    def __init__(self, data, rng):
        self.data, self.rng = data, rng
        self.nodes, self.inits = [], []
        self.k = 0
        c = data.draw(st.integers(1, 6), label="C")
        h = data.draw(st.integers(3, 10), label="H")
        w = data.draw(st.integers(3, 10), label="W")
        self.shapes = {"x": (1, c, h, w)}
        self.cur = "x"

    def name(self, stem):
        self.k += 1
        return f"{stem}{self.k}"

    def const(self, arr):
        n = self.name("k")
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), n))
        return n

    def add(self, op, inputs, shape, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        self.shapes[out] = shape
        self.cur = out
        return out

    def step(self):
        d, r = self.data, self.rng
        x = self.cur
        n, c, h, w = self.shapes[x]
        op = d.draw(
            st.sampled_from(
                [
                    "Conv",
                    "Unary",
                    "Add",
                    "Mul",
                    "Pool",
                    "BN",
                    "Concat",
                    "Pad",
                    "Slice",
                    "Transpose",
                    "Softmax",
                    "Reduce",
                ]
            )
        )
        if op == "Conv":
            g = d.draw(st.sampled_from([g for g in (1, c) if c % g == 0]))
            m = g * d.draw(st.integers(1, 4)) if g > 1 else d.draw(st.integers(1, 12))
            k = d.draw(st.integers(1, min(3, h, w)))
            s = d.draw(st.integers(1, 2))
            p = d.draw(st.integers(0, k // 2))
            wt = self.const(r.standard_normal((m, c // g, k, k)) * 0.5)
            b = self.const(r.standard_normal(m))
            oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            self.add(
                "Conv",
                [x, wt, b],
                (n, m, oh, ow),
                kernel_shape=[k, k],
                strides=[s, s],
                pads=[p] * 4,
                group=g,
            )
        elif op == "Unary":
            u = d.draw(st.sampled_from(UNARY))
            if u == "Clip":
                self.add("Clip", [x, self.const(-0.3), self.const(0.8)], (n, c, h, w))
            else:
                self.add(u, [x], (n, c, h, w))
        elif op in ("Add", "Mul"):
            same = [t for t, s in self.shapes.items() if s == (n, c, h, w) and t != x]
            if same and d.draw(st.booleans()):
                other = d.draw(st.sampled_from(sorted(same)))
            else:
                other = self.const(r.standard_normal((1, c, 1, 1)))
            self.add(op, [x, other], (n, c, h, w))
        elif op == "Pool":
            kind = d.draw(st.sampled_from(["MaxPool", "AveragePool", "GlobalAveragePool"]))
            if kind == "GlobalAveragePool" or min(h, w) < 2:
                self.add("GlobalAveragePool", [x], (n, c, 1, 1))
            else:
                self.add(
                    kind,
                    [x],
                    (n, c, (h - 2) // 2 + 1, (w - 2) // 2 + 1),
                    kernel_shape=[2, 2],
                    strides=[2, 2],
                )
        elif op == "BN":
            args = [
                self.const(r.uniform(0.5, 1.5, c)),
                self.const(r.standard_normal(c)),
                self.const(r.standard_normal(c)),
                self.const(r.uniform(0.5, 2.0, c)),
            ]
            self.add("BatchNormalization", [x, *args], (n, c, h, w))
        elif op == "Concat":
            same = [t for t, s in self.shapes.items() if s[2:] == (h, w) and len(s) == 4]
            other = d.draw(st.sampled_from(sorted(same)))
            self.add("Concat", [x, other], (n, c + self.shapes[other][1], h, w), axis=1)
        elif op == "Pad":
            p = [0, 0, d.draw(st.integers(0, 2)), d.draw(st.integers(0, 2))] * 2
            pads = self.name("pads")
            self.inits.append(numpy_helper.from_array(np.array(p, np.int64), pads))
            mode = d.draw(st.sampled_from(["constant", "reflect", "edge"]))
            if mode == "reflect" and (p[2] >= h or p[3] >= w):
                mode = "edge"
            self.add("Pad", [x, pads], (n, c, h + 2 * p[2], w + 2 * p[3]), mode=mode)
        elif op == "Slice" and h > 1:
            a = d.draw(st.integers(0, h - 1))
            names = []
            for v in ([a], [h], [2], [1]):
                names.append(self.name("s"))
                self.inits.append(numpy_helper.from_array(np.array(v, np.int64), names[-1]))
            self.add("Slice", [x, *names], (n, c, len(range(a, h)), w))
        elif op == "Transpose":
            t = self.add("Transpose", [x], (n, w, h, c), perm=[0, 3, 2, 1])
            self.add("Transpose", [t], (n, c, h, w), perm=[0, 3, 2, 1])
        elif op == "Softmax":
            self.add("Softmax", [x], (n, c, h, w), axis=1)
        elif op == "Reduce":
            axes = self.name("axes")
            self.inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes))
            self.add("ReduceMean", [x, axes], (n, c, 1, 1), keepdims=1)

    def model(self):
        x = self.cur
        if self.data.draw(st.booleans(), label="head"):
            n, c, h, w = self.shapes[x]
            f = self.add("Flatten", [x], (n, c * h * w))
            wt = self.const(self.rng.standard_normal((5, c * h * w)) * 0.2)
            self.add("Gemm", [f, wt, self.const(self.rng.standard_normal(5))], (n, 5), transB=1)
        graph = helper.make_graph(
            self.nodes,
            "rand",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.shapes["x"]))],
            [helper.make_tensor_value_info(self.cur, TensorProto.FLOAT, None)],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_graphs_match_ort(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    b = _Builder(data, rng)
    for _ in range(data.draw(st.integers(1, 6), label="ops")):
        b.step()
    model = b.model()
    x = rng.standard_normal(b.shapes["x"]).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    (got,) = build(model, flags=("-O1",)).run(x)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
