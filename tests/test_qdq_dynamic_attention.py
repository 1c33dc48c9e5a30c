"""``qdq(activations=dynamic)`` on attention: torch's transformer leaves and SDPA are spelled out
(as static ``qdq`` does), their projections become dynamic int8 Linears, and with
``matmul=dynamic`` the products of two activations (``q kᵀ``, ``p v``, a user's ``a @ b``)
quantize both operands per call (by default they stay float). ONNX Runtime runs them as integer
kernels (DynamicQuantizeMatMul / MatMulIntegerToFloat), torch simulation == ORT."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.backends import onnxruntime as gort
from graphopt.errors import OptionError
from graphopt.manager import Pipeline
from graphopt.quant.dynamic import DynamicQuantLinear
from graphopt.quant.observers import sqnr_db

INTEGER = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger")
FLOAT_MATMUL = {"MatMul", "FusedMatMul", "Gemm"}
DYNAMIC_MATMUL = torch.ops.graphopt.dynamic_matmul.default


def _ort_ops(path, tmp_path) -> collections.Counter:
    opt = tmp_path / f"{path.stem}.opt.onnx"
    gort.session(path, optimized_model_path=opt)
    return collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


def _dynamic(model, example, text="qdq(activations=dynamic,matmul=dynamic)"):
    graph = graphopt.trace(model, example)
    result = Pipeline.parse(text).run(graph)
    return graph, result.reports[0].details


def _matmuls(gm) -> int:
    return sum(n.op == "call_function" and n.target is DYNAMIC_MATMUL for n in gm.graph.nodes)


def _agree(path, inputs, want: torch.Tensor, ref: torch.Tensor) -> None:
    """torch == ORT within one step. ORT's integer kernels (DynamicQuantizeMatMul,
    MatMulIntegerToFloat, MatMulInteger) quantize every operand to the integers torch does (same
    scale, zero point and rounding): with ORT's fusions on, except SkipLayerNormalization, the
    two differ by float32 rounding only. That fusion (Add + LayerNorm in one kernel) rounds
    differently in the last bit, which now and then moves one element of the next layer's input
    across a rounding boundary, one step; it propagates to the outputs of that sample only,
    below the int8 error itself (``want - ref``, ref the fp32 model)."""
    import onnxruntime as ort

    want, ref = want.numpy(), ref.numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(
        str(path), opts, ["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"]
    )
    exact = gort.run(sess, *inputs)[0]
    assert float(np.abs(exact - want).max()) <= 1e-5 * float(np.abs(want).max())
    got = gort.run(path, *inputs)[0]
    rows = np.abs(got - want).reshape(len(got), -1).max(1)
    assert float(rows.max()) <= float(np.abs(want - ref).max()), rows
    assert (rows <= 1e-5 * float(np.abs(want).max())).mean() >= 0.75, rows


def test_dynamic_matmul_by_hand(tmp_path):
    """a = [-1, 0, 3]: s_a = 4/255, z_a = 64, a_q = [0, 64, 255]; b = [1, 1, 1]: s_b = 1/255,
    z_b = 0, b_q = 255; acc = (-64 + 0 + 191) * 255 = 32385 and y = s_a s_b acc = 4 * 127 / 255
    (float: 2)."""

    class Product(nn.Module):
        def forward(self, a, b):
            return a @ b.t()

    a, b = torch.tensor([[-1.0, 0.0, 3.0]]), torch.ones(1, 3)
    graph, rep = _dynamic(Product(), (a, b))
    assert _matmuls(graph.module) == 1 and rep["summary"].startswith("dynamic int8: 0 linear, 1")
    want = 4 * 127 / 255
    assert float(graph.module(a, b)) == pytest.approx(want, rel=1e-6)
    path = gort.export(graph, tmp_path / "product.onnx")
    kinds = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert kinds["DynamicQuantizeLinear"] == 2 and kinds["MatMulInteger"] == 1, kinds
    assert float(gort.run(path, a, b)[0][0, 0]) == pytest.approx(want, rel=1e-6)


class Encoder(nn.Module):
    """Tokens [B, T, 32] -> 2-layer ``nn.TransformerEncoder`` (post-norm ReLU; batch first or
    sequence first) -> mean over tokens -> Linear."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        if not self.batch_first:
            return self.fc(self.enc(x.transpose(0, 1)).mean(0))
        return self.fc(self.enc(x).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_projections_and_products_run_as_integer_kernels(batch_first, tmp_path):
    torch.manual_seed(0)
    model = Encoder(batch_first).eval()
    graph, rep = _dynamic(model, (torch.randn(2, 10, 32),))
    assert rep["attention"] == {
        "decomposed": [{"node": "enc", "module": "enc", "op": "TransformerEncoder"}],
        "kept": [],
    }
    gm = graph.module
    linears = [r["module"] for r in rep["layers"] if r["op"] == "linear (dynamic)"]
    assert len(linears) == 2 * 6 + 1  # q k v out linear1 linear2 per layer, and fc
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert f"enc.layers.1.self_attn.{p}" in linears
    assert all(isinstance(gm.get_submodule(m), DynamicQuantLinear) for m in linears)
    products = [r for r in rep["layers"] if r["op"] == "matmul (dynamic)"]
    assert [r["scores"] for r in products] == [True, False] * 2  # q kᵀ, p v per layer
    assert all(r["sqnr_db"] > 25 for r in rep["layers"]), rep["layers"]
    assert _matmuls(gm) == 4 and rep["skipped"] == []

    path = gort.export(graph, tmp_path / "enc.onnx")
    ops = _ort_ops(path, tmp_path)
    assert not FLOAT_MATMUL & set(ops), ops
    assert sum(ops[k] for k in INTEGER) == 13 + 4, ops
    x = torch.randn(32, 10, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, ref = gm(x), model(x)
    _agree(path, (x,), want, ref)
    assert sqnr_db(ref, want) > 30
    if batch_first:  # the C backend runs the same integers (DynamicQuantizeLinear, MatMulInteger)
        from graphopt.backends.c import build

        one = x[:1]  # (per-tensor scales: over the batch it is given)
        with torch.no_grad():
            want = gm(one).numpy()
        c = build(path, name="enc_dyn").run(one.numpy())[0]
        assert float(np.abs(c - want).max()) <= 1e-5 * float(np.abs(want).max())


@pytest.mark.parametrize("cross", [False, True])
def test_bare_multihead_attention(cross, tmp_path):
    """The packed in_proj and the out_proj (a NonDynamicallyQuantizableLinear) are int8 once
    the leaf is inlined; sequence-first, self- or cross-attention."""

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4)

        def forward(self, x, memory):
            return self.attn(x, memory if cross else x, memory if cross else x)[0]

    torch.manual_seed(0)
    model = MHA().eval()
    example = (torch.randn(6, 8, 32), torch.randn(9, 8, 32))  # dim 0 exported dynamic
    graph, rep = _dynamic(model, example)
    assert [r["op"] for r in rep["attention"]["decomposed"]] == ["MultiheadAttention"]
    gm = graph.module
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert isinstance(gm.get_submodule(f"attn.{p}"), DynamicQuantLinear)
    assert _matmuls(gm) == 2
    path = gort.export(graph, tmp_path / "mha.onnx")
    ops = _ort_ops(path, tmp_path)
    assert not FLOAT_MATMUL & set(ops) and sum(ops[k] for k in INTEGER) == 6, ops
    g = torch.Generator().manual_seed(2)
    x, memory = torch.randn(6, 8, 32, generator=g), torch.randn(9, 8, 32, generator=g)
    with torch.no_grad():
        want, ref = gm(x, memory), model(x, memory)
    _agree(path, (x, memory), want, ref)
    assert sqnr_db(ref, want) > 30


def test_attention_whose_weights_are_read_stays_a_float_leaf():
    class Weights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[1])

    graph, rep = _dynamic(Weights().eval(), (torch.randn(2, 4, 16),))
    assert rep["attention"]["decomposed"] == []
    assert "weights are read" in rep["attention"]["kept"][0]["reason"]
    assert type(graph.module.get_submodule("attn")) is nn.MultiheadAttention
    assert isinstance(graph.module.get_submodule("fc"), DynamicQuantLinear)


def test_matmul_option_and_refusals():
    """matmul=float (the default) keeps every product of two activations float, matmul=values
    those that feed a softmax (q kᵀ), matmul=dynamic none; a product with a constant operand
    stays float, a skipped one is listed as skipped."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            s = torch.bmm(self.q(x), self.k(x).transpose(1, 2)) / 8**0.5
            y = torch.softmax(s, -1).matmul(self.v(x))
            return (y @ self.w) @ y.transpose(1, 2)

    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 5, 8)
    reasons = {}
    for text, quantized in (
        ("qdq(activations=dynamic,matmul=dynamic)", 3),
        ("qdq(activations=dynamic,matmul=values)", 2),
        ("qdq(activations=dynamic)", 0),
    ):
        graph, rep = _dynamic(model, (x,), text)
        assert _matmuls(graph.module) == quantized, text
        assert sum(r["op"] == "linear (dynamic)" for r in rep["layers"]) == 3
        reasons[quantized] = sorted(r["reason"].split(" (")[0] for r in rep.get("float_ops", []))
        assert sqnr_db(model(x), graph.module(x)) > 25
        assert rep["skipped"] == []
    assert reasons[3] == ["matmul with a constant operand"]
    assert reasons[2] == ["attention scores", "matmul with a constant operand"]
    assert reasons[0] == ["matmul with a constant operand"] + ["matmul=float"] * 3
    graph, rep = _dynamic(model, (x,), "qdq(activations=dynamic,matmul=dynamic,skip=[bmm])")
    assert _matmuls(graph.module) == 2
    assert rep["skipped"] == [{"node": "bmm", "module": "", "reason": "skip (bmm)"}]
    with pytest.raises(OptionError, match="matmul=dynamic applies to activations=dynamic"):
        Pipeline.parse("qdq(matmul=dynamic)")


def test_default_keeps_attention_products_float(tmp_path):
    """By default only the projections are int8: q kᵀ and p v run as float MatMuls in ORT."""
    torch.manual_seed(0)
    model = Encoder(True).eval()
    graph, rep = _dynamic(model, (torch.randn(2, 10, 32),), "qdq(activations=dynamic)")
    assert len(rep["attention"]["decomposed"]) == 1 and _matmuls(graph.module) == 0
    assert [r["op"] for r in rep["float_ops"]] == ["matmul"] * 4
    assert rep["summary"].startswith("dynamic int8: 13 linear;")
    path = gort.export(graph, tmp_path / "enc.onnx")
    ops = _ort_ops(path, tmp_path)
    assert ops["MatMul"] + ops["FusedMatMul"] == 4 and sum(ops[k] for k in INTEGER) == 13, ops


def _bert(attn: str):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=99,
        max_position_embeddings=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_size=32,
        num_labels=3,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_attention_runs_as_integer_kernels(attn, tmp_path):
    """SDPA (spelled out) or HF's eager attention (torch.matmul already): q kᵀ and p v per
    layer are dynamic int8 products; logits close to fp32, torch == ORT."""
    model = _bert(attn)
    ids = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(1))
    graph, rep = _dynamic(model, {"input_ids": ids})
    if attn == "sdpa":
        assert len(rep["attention"]["decomposed"]) == 2 and rep["attention"]["kept"] == []
    else:
        assert "attention" not in rep
    products = [r for r in rep["layers"] if r["op"] == "matmul (dynamic)"]
    assert [r["scores"] for r in products] == [True, False] * 2
    assert all(r["module"].endswith("attention.self") for r in products)
    assert sum(r["op"] == "linear (dynamic)" for r in rep["layers"]) == 2 * 6 + 2  # pooler, head
    path = gort.export(graph, tmp_path / f"bert-{attn}.onnx")
    ops = _ort_ops(path, tmp_path)
    assert not FLOAT_MATMUL & set(ops), ops
    assert sum(ops[k] for k in INTEGER) == 2 * 6 + 2 + 4, ops
    x = torch.randint(0, 99, (16, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, ref = graph.module(x)["logits"], model(x).logits
    _agree(path, (x,), want, ref)
    assert sqnr_db(ref, want) > 30
