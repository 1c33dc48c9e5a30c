"""Transformer encoders through the C backend against ONNX Runtime (torch's TransformerEncoder
with relu/post-norm and with gelu/pre-norm, then an encoder written with
``scaled_dot_product_attention``, tanh gelu and ``layer_norm``, all in one model; and a Hugging
Face BERT): max |C - ORT| <= 1e-5 of max |ORT|. Then the kernels they need, one small graph each against ORT or numpy, on the
edges the models do not reach (LayerNorm over two axes and on data far from zero, negative
and out-of-range indices, three-way broadcasting, a lower-rank Expand, Softmax on a middle
axis, saturating casts), and the refusals that name the node."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.backends.c import UnsupportedError, build, build_many, emit
from graphopt.backends.onnxruntime import export


class SdpaEncoder(nn.Module):
    """Pre-norm encoder layers written with the functional API."""

    def __init__(self, d=64, heads=4, ff=128, layers=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(d, ff) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(ff, d) for _ in range(layers))
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(layers, 2, d))
        self.bias = nn.Parameter(0.1 * torch.randn(layers, 2, d))

    def forward(self, x):
        b, t, d = x.shape
        for i in range(len(self.proj)):
            y = F.layer_norm(x, (d,), self.gain[i, 0], self.bias[i, 0], eps=1e-6)
            q, k, v = self.qkv[i](y).chunk(3, dim=-1)
            q, k, v = (
                z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v)
            )
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj[i](a)
            y = F.layer_norm(x, (d,), self.gain[i, 1], self.bias[i, 1])
            x = x + self.down[i](F.gelu(self.up[i](y), approximate="tanh"))
        return x


def _torch_encoder(activation: str, norm_first: bool) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model=128,
        nhead=4,
        dim_feedforward=256,
        batch_first=True,
        dropout=0.0,
        activation=activation,
        norm_first=norm_first,
    )
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def _encoders():
    """torch's encoder with relu and post-norm, then with gelu (erf) and pre-norm, then the
    functional one: six layers in one export (exporting dominates this file's time)."""
    model = nn.Sequential(
        _torch_encoder("relu", False), _torch_encoder("gelu", True), SdpaEncoder(128, 4, 256)
    )
    return model.eval(), (torch.randn(1, 32, 128),)


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=1000,
        max_position_embeddings=64,
    )
    ids = torch.randint(0, 1000, (1, 32))
    return transformers.BertModel(cfg).eval(), {"input_ids": ids}


MODELS = {"encoders": _encoders, "bert": _bert}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> (onnx path, inputs, CModel): each model exported and compiled once."""
    root = tmp_path_factory.mktemp("c_transformer")
    out = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model, inputs = make()
        path = root / f"{name}.onnx"
        # torch.export builds BERT's attention mask even without one given (Where, IsNaN):
        # the ops test_bert_onnx_file_is_a_real_export guards; the default front end skips it
        frontend = "export" if name == "bert" else "auto"
        export(graphopt.trace(model, inputs, frontend=frontend), path)
        arrays = [t.numpy() for t in (inputs.values() if isinstance(inputs, dict) else inputs)]
        out[name] = (path, arrays, build(path, name=name))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_encoder_matches_ort(compiled, name):
    path, inputs, cm = compiled[name]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so)
    refs = sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), inputs)})
    got = cm.run(*inputs)
    assert len(got) == len(refs)
    for o, r, g in zip(sess.get_outputs(), refs, got):
        err, scale = float(np.abs(g - r).max()), float(np.abs(r).max())
        print(f"{name}.{o.name}: max|C-ORT| = {err:.2e}, max|ORT| = {scale:.2f}")
        assert g.shape == r.shape
        assert err <= 1e-5 * scale
    ops = cm.report["op_counts"]
    assert ops["LayerNormalization"] == {"encoders": 12, "bert": 5}[name]
    assert ops["Softmax"] == {"encoders": 6, "bert": 2}[name]
    if name == "bert":  # embeddings looked up at run time, position ids folded
        assert ops["Gather"] >= 1 and "GatherElements" not in ops and "Shape" not in ops


# -- kernels on small graphs ------------------------------------------------------------------
F32, I64, I32, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL
_NP = {F32: np.float32, I64: np.int64, I32: np.int32, BOOL: np.bool_, TensorProto.INT8: np.int8}


def _graph(nodes, inputs, outputs, inits=(), opset=18):
    """``inputs``: [(name, elem type, shape)], ``outputs``: names, ``inits``: {name: array}."""
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, 0, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)  # output types, which ORT needs


def _feeds(model, rng):
    out = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        if tt.elem_type == F32:
            out[vi.name] = rng.standard_normal(shape).astype(np.float32)
        elif tt.elem_type == BOOL:
            out[vi.name] = rng.random(shape) < 0.5
        else:
            out[vi.name] = rng.integers(-5, 5, shape).astype(_NP[tt.elem_type])
    return out


def _ln(axis, outputs=("y",), bias=True, scale_shape=None, eps=1e-5, scale_input=False):
    x_shape = [2, 3, 4, 8]
    norm = x_shape[axis:]
    rng = np.random.default_rng(axis + 10)
    s = (1 + 0.2 * rng.standard_normal(scale_shape or norm)).astype(np.float32)
    inits = {"b": (0.3 * rng.standard_normal(norm)).astype(np.float32)} if bias else {}
    inputs = [("x", F32, x_shape)]
    if scale_input:
        inputs.append(("s", F32, list(s.shape)))
    else:
        inits["s"] = s
    node = helper.make_node(
        "LayerNormalization",
        ["x", "s", "b"] if bias else ["x", "s"],
        list(outputs),
        axis=axis,
        epsilon=eps,
        name="ln",
    )
    return _graph([node], inputs, outputs, inits)


def _one(op, inputs, inits=(), opset=18, **attrs):
    names = [n for n, _, _ in inputs] + list(dict(inits))
    node = helper.make_node(op, names, ["y"], **attrs)
    return _graph([node], inputs, ["y"], inits, opset)


def _dynamic_linear(qmax: int):
    """graphopt's dynamic int8 Linear as it exports (ORT fuses it to DynamicQuantizeMatMul),
    with weights in [-qmax, qmax]."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((32, 24)).astype(np.float32)
    w_scale = (np.abs(w).max(0) / qmax).astype(np.float32)
    inits = {
        "wq": np.round(w / w_scale).astype(np.int8),
        "ws": w_scale,
        "bias": rng.standard_normal(24).astype(np.float32),
    }
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "wq", "xz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=F32),
        helper.make_node("Mul", ["xs", "ws"], ["s"]),
        helper.make_node("Mul", ["accf", "s"], ["ys"]),
        helper.make_node("Add", ["ys", "bias"], ["y"]),
    ]
    return _graph(nodes, [("x", F32, [2, 16, 32])], ["y"], inits)


def _matmul_integer():
    """int8 x uint8, batched with broadcasting, per-tensor A and per-column B zero points."""
    rng = np.random.default_rng(8)
    inits = {
        "b": rng.integers(0, 256, (5, 3)).astype(np.uint8),
        "za": np.array(-3, np.int8),
        "zb": rng.integers(0, 256, 3).astype(np.uint8),
    }
    node = helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])
    return _graph([node], [("a", TensorProto.INT8, [2, 1, 4, 5])], ["y"], inits)


CASES = {
    "ln_last": _ln(-1, ("y", "mean", "inv")),
    "ln_two_axes_broadcast_scale": _ln(2, scale_shape=[8]),
    "ln_axis1_no_bias": _ln(1, bias=False),
    "ln_runtime_scale": _ln(-1, scale_input=True, eps=1e-12),
    "gelu": _one("Gelu", [("x", F32, [3, 7])], opset=20),
    "gelu_tanh": _one("Gelu", [("x", F32, [3, 7])], opset=20, approximate="tanh"),
    "erf": _one("Erf", [("x", F32, [5, 6])]),
    "gather_neg_axis1": _one(
        "Gather", [("x", F32, [3, 5, 4])], {"i": np.array([[-1, 0], [4, -5]])}, axis=1
    ),
    "gather_runtime_i32": _one("Gather", [("x", F32, [6, 4]), ("i", I32, [2, 3])], axis=0),
    "gather_elements": _one(
        "GatherElements", [("x", F32, [3, 5])], {"i": np.array([[-1, 0, 4], [2, -3, 1]])}, axis=1
    ),
    "where_3way": _one("Where", [("c", BOOL, [1, 4]), ("a", F32, [3, 1]), ("b", F32, [])]),
    "expand_lower_rank": _one("Expand", [("x", F32, [3, 1])], {"s": np.array([2, 1, 4])}),
    "softmax_axis1": _one("Softmax", [("x", F32, [2, 5, 3])], axis=1),
    "matmul_batched": _one("MatMul", [("a", F32, [2, 1, 3, 4]), ("b", F32, [5, 4, 6])]),
    "matmul_vec": _one("MatMul", [("a", F32, [4]), ("b", F32, [2, 4, 3])]),
    "pow3": _one("Pow", [("x", F32, [4, 5])], {"p": np.array(3.0, np.float32)}),
    "pow_runtime": _one("Pow", [("x", F32, [4, 5]), ("p", F32, [5])]),
    "reduce_sum": _one(
        "ReduceSum", [("x", F32, [2, 3, 4])], {"axes": np.array([0, -1])}, keepdims=0
    ),
    "less": _one("Less", [("a", F32, [3, 4]), ("b", F32, [4])]),
    "equal_i64": _one("Equal", [("a", I64, [3, 4]), ("b", I64, [3, 1])]),
    "cast_i64_to_f32": _one("Cast", [("x", I64, [10])], to=F32),
    "cast_bool_to_f32": _one("Cast", [("x", BOOL, [10])], to=F32),
    # 7-bit weights: ORT's u8 x s8 kernels without VNNI saturate int16 pair sums beyond
    "dynamic_linear": _dynamic_linear(63),
    "dynamic_linear_8bit": _dynamic_linear(127),
    "matmul_integer": _matmul_integer(),
    "dynamic_quantize": _graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])],
        [("x", F32, [6])],
        ["y", "s", "z"],
    ),
}


@pytest.fixture(scope="module")
def kernels():
    return build_many(CASES)


def _init(name: str) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in CASES[name].graph.initializer}


def _dynamic_linear_ref(name, x):
    """DynamicQuantizeLinear by the ONNX spec, then exact integer products."""
    w = _init(name)
    lo, hi = min(0, x.min()), max(0, x.max())
    s = np.float32(hi - lo) / np.float32(255)
    z = np.rint(np.clip(-lo / s, 0, 255))
    q = np.clip(np.rint(x / s) + z, 0, 255)
    acc = (q - z).astype(np.int64) @ w["wq"].astype(np.int64)
    return [acc.astype(np.float32) * (s * w["ws"]) + w["bias"]]


def _matmul_integer_ref(name, a):
    """int64 products of the zero-point-shifted operands (ORT has no int8 x uint8 kernel)."""
    w = {k: v.astype(np.int64) for k, v in _init(name).items()}
    return [((a.astype(np.int64) - w["za"]) @ (w["b"] - w["zb"])).astype(np.int32)]


NUMPY_REFS = {"dynamic_linear_8bit": _dynamic_linear_ref, "matmul_integer": _matmul_integer_ref}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_ort(kernels, name):
    """ORT's output, or for the names in NUMPY_REFS numpy's."""
    cm = kernels[name]
    assert not isinstance(cm, Exception), cm
    feeds = _feeds(CASES[name], np.random.default_rng(len(name)))
    if name == "pow_runtime":
        feeds["x"] = np.abs(feeds["x"]) + 0.1
    if name in NUMPY_REFS:
        refs = NUMPY_REFS[name](name, *feeds.values())
    else:
        refs = ort.InferenceSession(CASES[name].SerializeToString()).run(None, feeds)
    for g, r in zip(cm.run(*feeds.values()), refs):
        assert g.shape == r.shape and g.dtype == r.dtype
        if r.dtype.kind in "iub":
            np.testing.assert_array_equal(g, r)
        else:
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "x, q, zp",
    [
        ([0, 2.5, 3.5, 255, 0.5, 1.5], [0, 2, 4, 255, 0, 2], 0),  # scale 1: ties to even
        ([-1.5, 253.5, 100.5, 0, 1, 2], [0, 255, 102, 2, 3, 4], 2),  # 253.5 -> 254 + 2: clamp
        ([-2.5, 252.5, 0, 0, 0, 0], [0, 254, 2, 2, 2, 2], 2),  # zero point 2.5 -> 2
        ([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], 0),  # empty range
    ],
)
def test_dynamic_quantize_rounds_half_to_even_and_saturates(kernels, x, q, zp):
    x = np.array(x, np.float32)
    y, s, z = kernels["dynamic_quantize"].run(x)
    assert y.tolist() == q and int(z) == zp
    assert float(s) == (1.0 if not x.any() else np.float32(x.max() - min(0, x.min())) / 255)
    if x.any():  # ORT agrees (for all zeros it returns the same values but scale 1/255)
        refs = ort.InferenceSession(CASES["dynamic_quantize"].SerializeToString()).run(
            None, {"x": x}
        )
        assert [r.tolist() for r in refs] == [y.tolist(), s.tolist(), z.tolist()]


def test_layernorm_is_accurate_far_from_zero(kernels):
    """Two passes (mean, then squared deviations): values around 1000 with spread 0.01 keep
    their statistics (a one-pass E[x^2] - E[x]^2 in float loses them entirely)."""
    rng = np.random.default_rng(3)
    x = (1000 + 0.01 * rng.standard_normal((2, 3, 4, 8))).astype(np.float32)
    init = {i.name: numpy_helper.to_array(i) for i in CASES["ln_last"].graph.initializer}
    y, mean, inv = kernels["ln_last"].run(x)
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    r = 1 / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, (x64 - mu) * r * init["s"] + init["b"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(mean, mu, rtol=1e-7)
    np.testing.assert_allclose(inv, r, rtol=1e-6)
    assert mean.shape == inv.shape == (2, 3, 4, 1)


def test_gather_out_of_range_runtime_index_gives_zeros(kernels):
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    i = np.array([[-1, 6, 0], [-7, 5, 100]], np.int32)
    (y,) = kernels["gather_runtime_i32"].run(x, i)
    np.testing.assert_array_equal(y[0, 0], x[5])
    np.testing.assert_array_equal(y[1, 1], x[5])
    for r, c in ((0, 1), (1, 0), (1, 2)):
        np.testing.assert_array_equal(y[r, c], 0)


def test_cast_float_to_int_truncates_and_saturates():
    x = np.array([1.9, -1.9, np.nan, 1e10, -1e10, 3e9, -0.5, 255.5, 300.0], np.float32)
    out = {"i32": TensorProto.INT32, "u8": TensorProto.UINT8, "i64": I64, "b": BOOL}
    nodes = [helper.make_node("Cast", ["x"], [k], to=v) for k, v in out.items()]
    cm = build(_graph(nodes, [("x", F32, [9])], list(out)))
    i32, u8, i64, b = cm.run(x)
    big = 2**31 - 1
    assert i32.tolist() == [1, -1, 0, big, -big - 1, big, 0, 255, 300]
    assert u8.tolist() == [1, 0, 0, 255, 0, 255, 0, 255, 255]
    assert i64.tolist() == [1, -1, 0, 10**10, -(10**10), 3 * 10**9, 0, 255, 300]
    assert b.tolist() == [True, True, True, True, True, True, True, True, True]


def test_constant_gather_elements_folds_with_shorter_indices():
    """torch.export's BERT gathers position ids from a longer buffer: folded at load."""
    buf = np.arange(64, dtype=np.int64).reshape(1, 64) * 3
    idx = np.arange(32, dtype=np.int64).reshape(1, 32) - 40  # negative: counts from the end
    nodes = [
        helper.make_node("GatherElements", ["buf", "idx"], ["pos"], axis=1),
        helper.make_node("Cast", ["pos"], ["posf"], to=F32),
        helper.make_node("Add", ["x", "posf"], ["y"]),
    ]
    model = _graph(nodes, [("x", F32, [1, 32])], ["y"], {"buf": buf, "idx": idx})
    cm = build(model)
    assert cm.report["op_counts"] == {"Add": 1}
    x = np.zeros((1, 32), np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(cm.run(x)[0], ref)


@pytest.mark.parametrize(
    "model, reason",
    [
        (_ln(-1, scale_shape=[3, 1, 8], bias=False), "does not broadcast to the normalized"),
        (_ln(2, scale_shape=[8], scale_input=True), "computed at run time and only partly"),
        (
            _graph(
                [helper.make_node("LayerNormalization", ["x", "s"], ["y"], stash_type=11)],
                [("x", F32, [2, 4])],
                ["y"],
                {"s": np.ones(4, np.float32)},
            ),
            "stash_type=11",
        ),
        (_one("Gelu", [("x", F32, [3])], opset=20, approximate="fast"), "approximate='fast'"),
        (_one("Gather", [("x", F32, [3, 2])], {"i": np.array([3])}), r"outside \[-3, 3\)"),
        (_one("Cast", [("x", F32, [3])], to=TensorProto.FLOAT16), "target type FLOAT16"),
        (_one("Where", [("c", F32, [3]), ("a", F32, [3]), ("b", F32, [3])]), "condition dtype"),
    ],
)
def test_unsupported_uses_are_refused_by_name(tmp_path, model, reason):
    node = model.graph.node[0]
    node.name = node.name or "the_node"
    with pytest.raises(UnsupportedError, match=reason) as e:
        emit(model, tmp_path)
    assert f"{node.op_type} node {node.name!r}" in str(e.value)


def test_bert_onnx_file_is_a_real_export(compiled):
    """The exported BERT holds the ops the C backend had to learn (a guard against an exporter
    change silently making the model test easier)."""
    ops = {n.op_type for n in onnx.load(str(compiled["bert"][0])).graph.node}
    assert {"LayerNormalization", "Gather", "Erf", "Where", "IsNaN"} <= ops


def test_shape_after_an_unsupported_op_is_not_blamed(tmp_path):
    """Shape folds once its input's shape is known: only the op that hid it is listed."""
    nodes = [
        helper.make_node("Hardmax", ["x"], ["a"], name="hm"),
        helper.make_node("Shape", ["a"], ["s"], name="shape"),
        helper.make_node("Reshape", ["x", "s"], ["y"]),
    ]
    model = _graph(nodes, [("x", F32, [2, 3])], ["y"])
    with pytest.raises(UnsupportedError, match=r"unsupported ops: Hardmax \(hm\)") as e:
        emit(model, tmp_path)
    assert "Shape" not in str(e.value)
