"""BatchNorms fold-bn cannot fold (after a ReLU) become int8 depthwise 1x1 convolutions in qdq:
the rewrite is exact in float, and the exported model holds no float BatchNormalization."""

from __future__ import annotations

import onnx
import torch
import torch.nn as nn

import graphopt
from graphopt.backends.onnxruntime import export
from graphopt.passes.qdq.batchnorm import batchnorm_as_conv


class BnAfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 5, padding=2)
        self.bn = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.bn(torch.relu(self.c1(x)))  # BN after ReLU: nothing to fold into
        return self.fc(torch.relu(self.c2(h)).mean(2))


def _trained_bn(model):
    torch.manual_seed(0)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_the_depthwise_conv_equals_the_batchnorm():
    bn = _trained_bn(BnAfterRelu()).bn
    x = torch.randn(3, 8, 11)
    torch.testing.assert_close(batchnorm_as_conv(bn)(x), bn(x), rtol=1e-5, atol=1e-6)


def test_qdq_quantizes_a_batchnorm_after_relu(tmp_path):
    model = _trained_bn(BnAfterRelu())
    data = [torch.randn(16, 2, 32) for _ in range(4)]
    g = graphopt.trace(model, (data[0][:1],))
    result = graphopt.Pipeline.parse("fold-bn,qdq").run(g, data=data)
    rep = result.reports[-1].details
    assert rep["batchnorm_as_conv"] == [{"node": "bn", "module": "bn"}]
    assert not any("BatchNorm" in f["op"] for f in rep["float_ops"]), rep["float_ops"]
    ops = {n.op_type for n in onnx.load(str(export(result.graph, tmp_path / "m.onnx"))).graph.node}
    assert "BatchNormalization" not in ops

    kept = graphopt.trace(model, (data[0][:1],))
    floaty = graphopt.Pipeline.parse("fold-bn,qdq(batchnorm=float)").run(kept, data=data)
    assert any("bn" == f["node"] for f in floaty.reports[-1].details["float_ops"])


def test_c_runs_the_rewritten_batchnorm_as_int8(tmp_path):
    import numpy as np

    from graphopt.backends.c import build
    from graphopt.backends.onnxruntime import session

    model = _trained_bn(BnAfterRelu())
    data = [torch.randn(16, 2, 32) for _ in range(4)]
    g = graphopt.trace(model, (data[0][:1],))
    result = graphopt.Pipeline.parse("fold-bn,qdq").run(g, data=data)
    path = export(result.graph, tmp_path / "m.onnx", dynamic_batch=False)
    cm = build(path)
    assert cm.report["op_counts"].get("QConv_i8") == 3, cm.report["op_counts"]
    sess = session(path)
    for x in data[0][:8]:
        x = x[None].numpy()
        got, want = cm.run(x)[0], sess.run(None, {"input": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
