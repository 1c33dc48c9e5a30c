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
