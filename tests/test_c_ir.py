"""``backends/c/ir.py``: lowering small handmade ONNX graphs to the C backend's program.

A stub op table keeps these tests about the loader itself (static shapes, constant folding,
initializers, QDQ weight info, error reporting); the last tests use the real table to check
the convolution geometry a Conv node carries to its kernels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.c import UnsupportedError, compile_program
from graphopt.backends.c.ir import FLOAT, Tensor, Unsupported, load
from graphopt.backends.c.opbase import ConvGeometry, Op, broadcast_shape
from graphopt.errors import BackendError


class Elementwise(Op):
    """Output 0: the inputs broadcast, dtype of input 0; records what infer saw."""

    def __init__(self):
        self.seen: list[tuple[str, list[Tensor | None]]] = []

    def infer(self, node, ins):
        self.seen.append((node.name, ins))
        return [(broadcast_shape(*[t.shape for t in ins if t is not None]), ins[0].dtype)]


class Reshape(Op):
    alias = True

    def infer(self, node, ins):
        if ins[1].value is None:
            raise Unsupported("shape is not a constant")
        return [(tuple(int(d) for d in ins[1].value), ins[0].dtype)]


class Refuses(Op):
    def infer(self, node, ins):
        raise Unsupported("not this time")


class WrongShape(Op):
    def infer(self, node, ins):
        return [((7,), ins[0].dtype)]


def _ops():
    e = Elementwise()
    return {"Add": e, "Mul": e, "Reshape": Reshape(), "Abs": Refuses(), "Neg": WrongShape()}


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "tiny", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


W = np.arange(12, dtype=np.float32).reshape(3, 4) / 8


def _tiny():
    """(x[batch, 3, 4] + w) * 2 (a Constant), reshaped to -(-Shape(x)) (folded to [1, 3, 4])."""
    nodes = [
        helper.make_node("Add", ["x", "w"], ["a"], name="add"),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Mul", ["a", "two"], ["m"]),  # unnamed: gets "Mul_2"
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Neg", ["s"], ["neg"]),  # all-constant input: folded, never inferred
        helper.make_node("Neg", ["neg"], ["s2"]),
        helper.make_node("Reshape", ["m", "s2"], ["y"], name="reshape"),
    ]
    return _model(
        nodes,
        [_vi("x", ["batch", 3, 4])],
        [_vi("y", None)],
        [numpy_helper.from_array(W, "w")],
    )


def test_tiny_graph_lowers_with_static_shapes_and_folded_constants():
    ops = _ops()
    prog = load(_tiny(), ops)
    assert prog.name == "tiny" and prog.opset == 17
    assert prog.inputs == ["x"] and prog.outputs == ["y"]
    x = prog.t("x")
    assert x.shape == (1, 3, 4) and x.dtype == FLOAT and x.value is None  # batch fixed to 1
    # the initializer keeps its values, dtype and shape
    w = prog.t("w")
    assert w.is_const and w.shape == (3, 4) and w.dtype == FLOAT
    np.testing.assert_array_equal(w.value, W)
    # Constant, Shape and the two Negs of a constant are folded to values
    assert prog.folded == 4
    two = prog.t("two")
    assert two.shape == () and two.dtype == FLOAT and float(two.value) == 2.0
    np.testing.assert_array_equal(prog.t("s").value, [1, 3, 4])
    assert prog.t("s").dtype == np.int64
    np.testing.assert_array_equal(prog.t("s2").value, [1, 3, 4])
    # only the nodes that compute at run time remain, in order, named
    assert [(n.op, n.name) for n in prog.nodes] == [
        ("Add", "add"),
        ("Mul", "Mul_2"),
        ("Reshape", "reshape"),
    ]
    assert prog.nodes[0].inputs == ["x", "w"] and prog.nodes[0].outputs == ["a"]
    # shapes and dtypes the op table computed
    assert prog.t("a").shape == (1, 3, 4) and prog.t("m").dtype == FLOAT
    assert prog.t("y").shape == (1, 3, 4) and prog.t("y").value is None
    assert [name for name, _ in ops["Add"].seen] == ["add", "Mul_2"]
    assert prog.t("a").nbytes == 12 * 4 and prog.t("a").ctype == "float"


def test_input_shapes_replace_symbolic_dimensions():
    m = _model(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        [_vi("x", ["batch", "seq"])],
        [_vi("y", None)],
    )
    with pytest.raises(BackendError, match=r"symbolic dimension 1 \(seq\).*input_shapes"):
        load(m, _ops())
    prog = load(m, _ops(), input_shapes={"x": (2, 5)})
    assert prog.t("x").shape == (2, 5) and prog.t("y").shape == (2, 5)
    with pytest.raises(BackendError, match=r"unknown graph inputs: \['z'\]"):
        load(m, _ops(), input_shapes={"x": (2, 5), "z": (1,)})


def test_the_model_is_not_modified():
    m = _tiny()
    before = m.SerializeToString()
    load(m, _ops())
    assert m.SerializeToString() == before


def test_a_folded_dequantize_keeps_the_integer_weights():
    q = np.array([[-3, 0, 5], [127, -128, 1]], np.int8)
    scale = np.array([0.5, 0.25], np.float32)
    zp = np.array([1, -2], np.int8)
    m = _model(
        [
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["wd"], axis=0),
            helper.make_node("Add", ["x", "wd"], ["y"]),
        ],
        [_vi("x", [2, 3])],
        [_vi("y", None)],
        [
            numpy_helper.from_array(q, "q"),
            numpy_helper.from_array(scale, "s"),
            numpy_helper.from_array(zp, "z"),
        ],
    )
    prog = load(m, _ops())
    wd = prog.t("wd")
    want = (q.astype(np.float32) - zp[:, None]) * scale[:, None]
    np.testing.assert_allclose(wd.value, want)
    assert wd.dtype == FLOAT
    np.testing.assert_array_equal(wd.qinfo["q"], q)
    np.testing.assert_array_equal(wd.qinfo["scale"], scale)
    np.testing.assert_array_equal(wd.qinfo["zp"], zp)
    assert wd.qinfo["axis"] == 0
    assert [n.op for n in prog.nodes] == ["Add"]


def test_every_unsupported_node_is_reported_at_once():
    m = _model(
        [
            helper.make_node("Add", ["x", "x"], ["a"], name="ok"),
            helper.make_node("Sin", ["a"], ["b"], name="sin1"),
            helper.make_node("Add", ["b", "x"], ["c"], name="after_sin"),  # unknown input shape
            helper.make_node("Abs", ["x"], ["d"], name="abs"),
            helper.make_node("Cos", ["x"], ["e"], name="cos"),
            helper.make_node("Sin", ["x"], ["f"], name="sin2"),
        ],
        [_vi("x", [2])],
        [_vi("c", None), _vi("d", None), _vi("e", None), _vi("f", None)],
    )
    with pytest.raises(UnsupportedError) as info:
        load(m, _ops())
    msg = str(info.value)
    assert "unsupported ops: Cos (cos); Sin (sin1, sin2)" in msg
    assert "unsupported uses: Abs node 'abs': not this time" in msg
    assert "after_sin" not in msg  # a supported op after an unsupported one is not blamed


def test_an_op_disagreeing_with_onnx_shape_inference_is_an_error():
    m = _model([helper.make_node("Neg", ["x"], ["y"], name="n")], [_vi("x", [3])], [_vi("y", None)])
    with pytest.raises(BackendError, match=r"Neg node 'n': output 'y' has shape \(7,\)"):
        load(m, _ops())


def test_unsorted_graph_and_missing_file_are_errors(tmp_path):
    m = _model(
        [helper.make_node("Add", ["a", "x"], ["y"]), helper.make_node("Add", ["x", "x"], ["a"])],
        [_vi("x", [2])],
        [_vi("y", None)],
    )
    with pytest.raises(BackendError, match="not topologically sorted"):
        load(m, _ops())
    with pytest.raises(BackendError, match="does not exist"):
        load(tmp_path / "nope.onnx", _ops())


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny(), str(path))
    assert [n.name for n in load(path, _ops()).nodes] == ["add", "Mul_2", "reshape"]


# -- the real op table: convolution geometry ----------------------------------------------------
def _conv_model(x_shape, w_shape, qdq=False, **attrs):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", **attrs)]
    out = "c"
    if qdq:
        inits = [
            numpy_helper.from_array(np.clip(np.round(w * 20), -127, 127).astype(np.int8), "wq"),
            numpy_helper.from_array(np.array(0.05, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
            helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]),
            helper.make_node("Conv", ["xd", "w"], ["c"], name="conv", **attrs),
            helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]),
            helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"]),
        ]
        out = "y"
    return _model(nodes, [_vi("x", list(x_shape))], [_vi(out, None)], inits)


def test_conv_carries_its_2d_geometry():
    m = _conv_model(
        (2, 8, 10, 9), (6, 4, 3, 2), group=2, strides=[2, 1], dilations=[1, 2], pads=[1, 0, 1, 2]
    )
    prog = compile_program(m)
    (conv,) = prog.nodes
    geo = conv.extra["geo"]
    # H: (10 + 1 + 1 - 3) // 2 + 1 = 5; W: (9 + 0 + 2 - (2 * (2 - 1) + 1)) // 1 + 1 = 9
    assert geo == ConvGeometry(
        N=2, C=8, H=10, W=9, M=6, OH=5, OW=9, KH=3, KW=2, sh=2, sw=1, dh=1, dw=2, ph=1, pw=0, G=2
    )
    assert prog.t("c").shape == (2, 6, 5, 9)
    assert geo.args() == "8, 10, 9, 6, 5, 9, 3, 2, 2, 1, 1, 2, 1, 0, 2"
    assert geo.x_size == 8 * 10 * 9 and geo.y_size == 6 * 5 * 9 and not geo.depthwise


def test_a_1d_conv_is_a_2d_conv_of_height_1():
    m = _conv_model((1, 4, 20), (8, 4, 5), strides=[3], pads=[2, 1], auto_pad="NOTSET")
    geo = compile_program(m).nodes[0].extra["geo"]
    assert (geo.H, geo.OH, geo.KH, geo.sh, geo.dh, geo.ph) == (1, 1, 1, 1, 1, 0)
    assert (geo.W, geo.OW, geo.KW, geo.sw, geo.pw) == (20, 7, 5, 3, 2)


def test_the_int8_conv_keeps_the_geometry_of_the_float_conv():
    m = _conv_model((1, 4, 6, 6), (4, 1, 3, 3), qdq=True, group=4, pads=[1, 1, 1, 1])
    float_geo = compile_program(m, int8=False)
    (conv,) = [n for n in float_geo.nodes if n.op == "Conv"]
    q = [n for n in compile_program(m).nodes if n.op == "QConv_i8"]
    assert len(q) == 1
    assert q[0].extra["geo"] == conv.extra["geo"]
    assert q[0].extra["geo"].depthwise and q[0].extra["geo"].N == 1
