"""``qdq(activations=dynamic)``: Linear layers with int8 weights and inputs quantized per call,
lowered to ORT's DynamicQuantizeMatMul."""

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
from graphopt.passes.qdq import QDQ
from graphopt.quant.dynamic import DynamicQuantLinear
from graphopt.registry import Registry


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry()
    reg.add(QDQ)
    return reg


class Block(nn.Module):
    """A transformer-style MLP block on [batch, tokens, features]."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = x + self.fc2(self.act(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


def _ops(path, tmp_path) -> collections.Counter:
    opt = tmp_path / "opt.onnx"
    gort.session(path, optimized_model_path=opt)
    return collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


def test_dynamic_block_runs_as_dynamic_quantize_matmul(registry, tmp_path):
    torch.manual_seed(0)
    model = Block().eval()
    graph = graphopt.trace(model, (torch.randn(2, 16, 32),))
    result = Pipeline.parse("qdq(activations=dynamic)", registry=registry).run(graph)  # no data
    gm = result.graph.module
    assert all(isinstance(gm.get_submodule(n), DynamicQuantLinear) for n in ("fc1", "fc2", "head"))
    layers = result.reports[0].details["layers"]
    assert [r["node"] for r in layers] == ["fc1", "fc2", "head"]
    assert all(r["sqnr_db"] > 30 for r in layers)
    path = gort.export(result.graph, tmp_path / "block.onnx")
    ops = _ops(path, tmp_path)
    assert ops["DynamicQuantizeMatMul"] == 3 and not {"MatMul", "Gemm"} & set(ops), ops
    x = torch.randn(8, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = gm(x).numpy()
        ref = model(x).numpy()
    got = gort.run(path, x)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(want - ref).max() < 0.02 * np.abs(ref).max()


def test_dynamic_quantization_by_hand(registry, tmp_path):
    """x = [-1, 0, 3]: s_x = 4/255, z_x = round(1 / s_x) = 64, x_q = [0, 64, 255];
    W = [1, 1, 1]: s_w = 1/127, W_q = 127; acc = (-64 + 0 + 191) * 127 = 16129 and
    y = s_x s_w acc = 4 * 127 / 255 (float: 2)."""
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    x = torch.tensor([[-1.0, 0.0, 3.0]])
    graph = graphopt.trace(nn.Sequential(layer).eval(), (x,))
    result = Pipeline.parse("qdq(activations=dynamic)", registry=registry).run(graph)
    want = 4 * 127 / 255
    assert float(result.graph.module(x)) == pytest.approx(want, rel=1e-6)
    path = gort.export(result.graph, tmp_path / "hand.onnx")
    assert float(gort.run(path, x)[0][0, 0]) == pytest.approx(want, rel=1e-6)


def test_dynamic_leaves_convolutions_and_skips_alone(registry):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)
            self.out = nn.Linear(2, 2)

        def forward(self, x):
            return self.out(self.fc(self.conv(x).mean((2, 3))))

    graph = graphopt.trace(Mixed().eval(), (torch.randn(1, 3, 6, 6),))
    result = Pipeline.parse("qdq(activations=dynamic,skip=[out])", registry=registry).run(graph)
    gm = result.graph.module
    assert type(gm.get_submodule("conv")) is nn.Conv2d
    assert isinstance(gm.get_submodule("fc"), DynamicQuantLinear)
    assert type(gm.get_submodule("out")) is nn.Linear
    assert result.reports[0].details["skipped"][0]["module"] == "out"
    with pytest.raises(graphopt.PassFailure, match="already quantized"):
        Pipeline.parse("qdq(activations=dynamic)", registry=registry).run(result.graph)


class Tokens(nn.Module):
    """Token ids -> embedding -> linear, with one row far larger than the rest."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 4)
        with torch.no_grad():
            self.emb.weight[7] *= 100.0  # one per-tensor scale would flatten every other row

    def forward(self, ids):
        return self.fc(self.emb(ids))


def test_embedding_tables_become_int8_rows_and_run_in_ort(tmp_path):
    from graphopt.quant.dynamic import QuantEmbedding
    from graphopt.quant.observers import sqnr_db

    torch.manual_seed(0)
    net = Tokens().eval()
    ids = torch.randint(0, 50, (2, 12))
    ref = net(ids).detach()
    g = graphopt.trace(net, ids)
    result = graphopt.Pipeline.parse("qdq(activations=dynamic)").run(g)
    assert isinstance(g.module.get_submodule("emb"), QuantEmbedding)
    assert g.module.get_submodule("emb").weight_int8.dtype == torch.int8
    assert "1 embedding table" in result.reports[0].details["summary"]
    ops = {r["module"]: r["op"] for r in result.reports[0].details["layers"]}
    assert ops["emb"] == "embedding (int8 rows)"
    # each row keeps its own step: the large row does not coarsen the others
    assert sqnr_db(ref, g.module(ids).detach()) > 30
    path = gort.export(g, tmp_path / "tokens.onnx")
    kinds = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert kinds["Gather"] >= 2 and kinds["MatMulInteger"] == 1
    assert gort.check_parity(g, path, rtol=1e-5)["ok"]
    kept = graphopt.trace(net, ids)
    graphopt.Pipeline.parse("qdq(activations=dynamic,embeddings=float)").run(kept)
    assert type(kept.module.get_submodule("emb")) is nn.Embedding
