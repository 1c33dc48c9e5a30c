"""The arena planner: no two buffers live at the same step overlap, the lower bound is the
largest live sum, views share their input's storage, element-wise ops reuse dying inputs."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.c import OPS, compile_program
from graphopt.backends.c.planner import ALIGN, plan


def _branchy():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["a"]),  # reads the graph input in place
        helper.make_node("Conv", ["a", "w"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["b"], ["c"]),  # b dies here: c overwrites it
        helper.make_node("Conv", ["c", "w2"], ["d"]),
        helper.make_node("Add", ["d", "a"], ["e"]),  # a skip connection keeps a alive
        helper.make_node("Reshape", ["e", "shape"], ["f"]),  # a view of e
        helper.make_node("Softmax", ["f"], ["y"], axis=1),
    ]
    g = helper.make_graph(
        nodes,
        "branchy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, w2, shape],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _check(p):
    for i, a in enumerate(p.buffers):
        assert a.offset % ALIGN == 0
        assert a.offset + a.nbytes <= p.arena_bytes
        for b in p.buffers[i + 1 :]:
            if a.first <= b.last and b.first <= a.last and a.nbytes and b.nbytes:
                assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset, (a, b)
    steps = max((b.last for b in p.buffers), default=0) + 1
    live = [sum(b.nbytes for b in p.buffers if b.first <= s <= b.last) for s in range(steps)]
    assert p.lower_bound == max(live, default=0)
    assert p.arena_bytes >= p.lower_bound


def test_branchy_graph_plan():
    prog = compile_program(_branchy())
    p = plan(prog, OPS)
    _check(p)
    assert p.where["x"] == ("input", 0) and p.where["y"] == ("output", 0)
    assert p.where["f"] == p.where["e"]  # the Reshape is a view
    assert p.where["c"] == p.where["b"]  # Tanh wrote over its dying input
    assert p.inplace >= 1 and p.aliased == 1
    # a (4x6x6 floats) stays live across both convs: the peak is the 1x1 conv's step,
    # a + c (8x6x6, in b's buffer) + d (4x6x6)
    assert p.lower_bound == 4 * (4 * 36 + 8 * 36 + 4 * 36)


def test_plans_of_hypothesis_like_chains_are_valid():
    rng = np.random.default_rng(1)
    for trial in range(20):
        n = int(rng.integers(3, 12))
        nodes, inits, names = [], [], ["x"]
        for k in range(n):
            op = rng.choice(["Relu", "Add", "Concat", "Sigmoid"])
            a = names[-1]
            b = names[int(rng.integers(0, len(names)))]
            out = f"t{k}"
            if op == "Add":
                nodes.append(helper.make_node("Add", [a, b], [out]))
            elif op == "Concat":
                nodes.append(helper.make_node("Concat", [a, b], [f"c{k}"], axis=1))
                nodes.append(helper.make_node("Slice", [f"c{k}", "s0", "s1", "ax"], [out]))
            else:
                nodes.append(helper.make_node(str(op), [a], [out]))
            names.append(out)
        inits = [
            numpy_helper.from_array(np.array([0], np.int64), "s0"),
            numpy_helper.from_array(np.array([3], np.int64), "s1"),
            numpy_helper.from_array(np.array([1], np.int64), "ax"),
        ]
        g = helper.make_graph(
            nodes,
            f"chain{trial}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5])],
            [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, None)],
            inits,
        )
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        _check(plan(compile_program(model), OPS))


def _dw_chain():
    """pointwise -> depthwise 3x3 stride 2 (pads 1) -> pointwise -> depthwise 5x5 stride 1."""
    rng = np.random.default_rng(2)

    def w(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"]),
        helper.make_node("Conv", ["a", "w1"], ["b"], group=8, strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w2"], ["c"]),
        helper.make_node("Conv", ["c", "w3"], ["d"], group=8, pads=[2, 2, 2, 2]),
        helper.make_node("Conv", ["d", "w4"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "dw_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            w("w0", (8, 4, 1, 1)),
            w("w1", (8, 1, 3, 3)),
            w("w2", (8, 8, 1, 1)),
            w("w3", (8, 1, 5, 5)),
            w("w4", (4, 8, 1, 1)),
        ],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_depthwise_conv_writes_over_its_dying_input():
    prog = compile_program(_dw_chain())
    for node in prog.nodes:
        OPS[node.op].prepare(node, prog.tensors, False)
    assert [n.extra.get("kernel") for n in prog.nodes].count("depthwise") == 2
    p = plan(prog, OPS)
    _check(p)
    # both depthwise convs (stride 2 over a 9x9 input, and stride 1 with 5x5 taps) reuse
    # their input's buffer; the pointwise convs do not
    assert p.where["b"] == p.where["a"] and p.where["d"] == p.where["c"]
    assert p.where["c"] != p.where["b"]
    layerwise = plan(prog, OPS, kernels_inplace=False)
    _check(layerwise)
    assert layerwise.where["b"] != layerwise.where["a"]
    assert p.inplace == layerwise.inplace + 2
    # the peak without in-place is a (8x9x9) + b (8x5x5) + the depthwise scratch; in place,
    # b lives in a's buffer
    assert p.lower_bound < layerwise.lower_bound
    assert layerwise.lower_bound - p.lower_bound >= 4 * 8 * 5 * 5
