"""Static ``qdq`` on transformers: Linear layers on token tensors ``[B, T, C]`` and the attention
products quantized, run by ONNX Runtime as integer kernels (MatMulIntegerToFloat for the
projections, QLinearMatMul for ``q kᵀ`` and ``p v``), torch simulation == ORT == C.

Models: a ``nn.TransformerEncoder`` (a leaf module for fx, inlined by ``qdq``: post-norm/ReLU
batch-first and pre-norm/GELU sequence-first layers), and small Hugging Face BERT and ViT built
from configs (export front end, ``scaled_dot_product_attention`` spelled out)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.backends import onnxruntime as gort
from graphopt.manager import Pipeline
from graphopt.quant.modules import DQ_OPS, QuantLinear

INTEGER_MATMUL = ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QGemm")
FLOAT_MATMUL = {"MatMul", "FusedMatMul", "Gemm"}


class Encoders(nn.Module):
    """Tokens [B, 6, 8] -> Linear -> post-norm ReLU encoder (batch first) -> pre-norm GELU
    encoder (sequence first) -> mean over tokens -> Linear (float logits)."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.emb = nn.Linear(8, d)
        a = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        b = nn.TransformerEncoderLayer(
            d, 4, 64, dropout=0.0, activation="gelu", norm_first=True, batch_first=False
        )
        self.enc = nn.TransformerEncoder(a, 2, enable_nested_tensor=False)
        self.enc2 = nn.TransformerEncoder(b, 1, enable_nested_tensor=False)
        self.fc = nn.Linear(d, 5)

    def forward(self, x):
        h = self.enc(self.emb(x))
        h = self.enc2(h.transpose(0, 1)).transpose(0, 1)
        return self.fc(h.mean(1))


ENCODER_LINEARS = 4 * 3 + 2 * 3 + 1  # q, k, v, out, linear1, linear2 per layer; emb (3-D)


def _ort_ops(path, tmp_path) -> collections.Counter:
    opt = tmp_path / f"{path.stem}.opt.onnx"
    gort.session(path, optimized_model_path=opt)
    return collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


def _float_logit_bound(gm, name: str) -> float:
    """A float output behind an int8 Linear: one input step on every element moves an output
    by at most ``s_x * max_n sum_k |W[n, k]|``."""
    fc = gm.get_submodule(name)
    w = fc.weight_int8.float() * fc.weight_scale[:, None]
    return fc.in_scale * float(w.abs().sum(1).max())


def _quantize(model, example, data, text="qdq"):
    return graphopt.compress(model, Pipeline.parse(text), example, data=data)


def _qdq_report(result) -> dict:
    return next(r for r in result.reports if r.name == "qdq").details


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    model = Encoders().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 6, 8, generator=g) for _ in range(4)]
    return model, data


@pytest.fixture(scope="module")
def encoders_int8(encoders, tmp_path_factory):
    model, data = encoders
    result = _quantize(model, (data[0][:2],), data)
    path = gort.export(result.graph, tmp_path_factory.mktemp("enc") / "encoders_q.onnx")
    return result, path


def test_encoder_leaves_are_inlined_and_their_linears_quantized(encoders_int8):
    result, _ = encoders_int8
    rep = _qdq_report(result)
    assert [r["module"] for r in rep["attention"]["decomposed"]] == ["enc", "enc2"]
    assert rep["attention"]["kept"] == []
    gm = result.graph.module
    linears = {r["module"] for r in rep["layers"] if r["op"].startswith("linear")}
    assert len(linears) == ENCODER_LINEARS + 1  # and the 2-D fc
    for i in range(2):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            assert f"enc.layers.{i}.{p}" in linears
        assert f"enc.layers.{i}.linear1" in linears and f"enc.layers.{i}.linear2" in linears
    assert "enc2.layers.0.self_attn.q_proj" in linears and "emb" in linears
    for name in linears:
        assert isinstance(gm.get_submodule(name), QuantLinear), name
    # q k^T and p v per attention, both activations quantized
    matmuls = [r for r in rep["layers"] if r["op"] == "matmul"]
    assert len(matmuls) == 2 * 3 and all(
        len(r["inputs"]) == 2 and all(r["inputs"]) for r in matmuls
    )
    # the ReLU after linear1 is fused into its unit; LayerNorm, softmax, GELU stay float
    assert sum(r["op"] == "linear+relu" for r in rep["layers"]) == 2
    floats = collections.Counter(f["reason"].split()[0] for f in rep["float_ops"])
    assert floats["LayerNorm"] == 2 * 3 and floats["softmax"] == 3 and floats["gelu"] == 1
    # q k^T writes float scores for the softmax; fc writes float logits
    outs = collections.Counter(f["reason"].split(":")[0] for f in rep["float_outputs"])
    assert outs == {"attention scores": 3, "model output": 1}, rep["float_outputs"]


def test_encoder_inlining_is_exact(encoders):
    """The inlined encoder computes what torch's leaf modules compute (float, before int8)."""
    from graphopt.passes.qdq.decompose import decompose_attention

    model, data = encoders
    graph = graphopt.trace(model, (data[0][:2],))
    rep = decompose_attention(graph.module, lambda n: False)
    assert len(rep["decomposed"]) == 2
    kinds = {type(m).__name__ for m in graph.module.modules()}
    assert not kinds & {"TransformerEncoder", "TransformerEncoderLayer", "MultiheadAttention"}
    with torch.no_grad():
        torch.testing.assert_close(graph.module(data[1]), model(data[1]), atol=1e-5, rtol=1e-5)


def test_encoder_runs_as_integer_kernels_in_ort(encoders_int8, tmp_path):
    _, path = encoders_int8
    ops = _ort_ops(path, tmp_path)
    assert not FLOAT_MATMUL & set(ops), ops
    # the projections and q k^T (float scores for a float softmax) write float; p v int8
    assert ops["MatMulIntegerToFloat"] == ENCODER_LINEARS + 3 and ops["QGemm"] == 1, ops
    assert ops["QLinearMatMul"] == 3, ops
    assert ops["Softmax"] == 3 and "QLinearSoftmax" not in ops, ops
    assert sum(ops[k] for k in INTEGER_MATMUL) >= ENCODER_LINEARS + 1 + 6
    assert ops["QLinearAdd"] >= 2 * 3, ops  # residual adds


@pytest.mark.parametrize("target", ["auto", "avx2"])
def test_encoder_torch_matches_ort_and_c(encoders, encoders_int8, target, tmp_path):
    """Float logits behind QGemm: torch == ORT within one input step through fc (on most samples
    to float32 rounding: every int8 value equal); at target=avx2 (7-bit weights, u8 activations)
    too. The C backend matches ORT the same way."""
    model, data = encoders
    if target == "auto":
        result, path = encoders_int8
    else:
        result = _quantize(model, (data[0][:2],), data, f"qdq(target={target})")
        path = gort.export(result.graph, tmp_path / "encoders_avx2.onnx")
        weights = [
            m.weight_int8 for m in result.graph.module.modules() if isinstance(m, QuantLinear)
        ]
        assert max(int(w.abs().max()) for w in weights) <= 63
    x = torch.randn(64, 6, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = result.graph.module(x).numpy()
        ref = model(x).numpy()
    got = gort.run(path, x)[0]
    bound = _float_logit_bound(result.graph.module, "fc")
    err = float(np.abs(got - want).max())
    assert err <= bound, (err, bound)
    # most samples agree far below the int8 error itself (every int8 value equal); float32
    # rounding in a different summation order can put one value across a rounding boundary,
    # and that sample then differs by up to the step bound above
    same = np.abs(got - want).max(axis=1) < 1e-3 * float(np.abs(want - ref).max())
    assert same.mean() >= 0.9, same.mean()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    if target == "auto":
        from graphopt.backends.c import build

        cm = build(path, name="enc_q")
        c = np.concatenate([cm.run(x[i : i + 1].numpy())[0] for i in range(8)])
        assert float(np.abs(c - got[:8]).max()) <= bound


# -- Hugging Face -----------------------------------------------------------------------------------
def _hf(kind: str):
    transformers = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, hidden_size=32)
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=99, max_position_embeddings=16, **small)
        data = [torch.randint(0, 99, (8, 8), generator=g) for _ in range(4)]
        return transformers.BertModel(cfg).eval(), {"input_ids": data[0][:2]}, data
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, **small)
    data = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(4)]
    return transformers.ViTModel(cfg).eval(), (data[0][:2],), data


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_hf_attention_and_linears_run_as_integer_kernels(kind, tmp_path):
    model, example, data = _hf(kind)
    result = _quantize(model, example, data)
    rep = _qdq_report(result)
    assert len(rep["attention"]["decomposed"]) == 2  # one scaled_dot_product_attention a layer
    gm = result.graph.module
    linears = [r for r in rep["layers"] if r["op"].startswith("linear")]
    on_tokens = [r for r in linears if any(f".{i}." in r["module"] for i in range(2))]
    assert len(on_tokens) == 6 * 2, [r["module"] for r in linears]  # q k v out up down per layer
    assert sum(r["op"] == "matmul" for r in rep["layers"]) == 4
    path = gort.export(result.graph, tmp_path / f"{kind}_q.onnx")
    ops = _ort_ops(path, tmp_path)
    assert not FLOAT_MATMUL & set(ops), ops
    assert ops["QLinearMatMul"] == 2 and "QLinearSoftmax" not in ops, ops  # p v
    assert ops["MatMulIntegerToFloat"] + ops["QGemm"] >= len(linears) + 2, ops  # and q k^T

    # float outputs behind LayerNorm (and the pooler's tanh): every int8 value equal, so the
    # engines differ by float32 rounding only, a thousandth of what int8 moves the outputs
    x = tuple(example.values()) if isinstance(example, dict) else example
    x = tuple(torch.cat([t, t.flip(0)]) for t in x)
    with torch.no_grad():
        want = [t.numpy() for t in _outputs(gm(*x))]
        ref = [t.numpy() for t in _outputs(model(*x))]
    got = gort.run(path, *x)
    assert len(got) == len(want) == 2
    for w, r, o in zip(want, ref, got):
        err = float(np.abs(o - w).max())
        assert err <= 1e-3 * float(np.abs(w - r).max()), (err, float(np.abs(w - r).max()))
        assert err <= 1e-5 * float(np.abs(w).max())


def _outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values"):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    return [v for v in out if isinstance(v, torch.Tensor)]


def test_masked_or_training_attention_is_left_alone():
    """Calls the plain-op form cannot express keep the leaf, with the reason."""
    from graphopt.passes.qdq.decompose import decompose_attention

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=True)[1]  # reads the weights

    graph = graphopt.trace(Masked().eval(), (torch.randn(2, 4, 16),))
    rep = decompose_attention(graph.module, lambda n: False)
    assert rep["decomposed"] == [] and "weights are read" in rep["kept"][0]["reason"]

    # a plain self-attention call is inlined, and equal
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    model = Plain().eval()
    x = torch.randn(4, 2, 16)
    graph = graphopt.trace(model, (x,))
    rep = decompose_attention(graph.module, lambda n: False)
    assert [r["op"] for r in rep["decomposed"]] == ["MultiheadAttention"]
    with torch.no_grad():
        torch.testing.assert_close(graph.module(x), model(x), atol=1e-5, rtol=1e-5)
    assert not any(n.op == "call_function" and n.target in DQ_OPS for n in graph.module.graph.nodes)
