"""qdq's placement on small graphs: which ops form fusion units, which values are quantized,
which pass-through outputs share their root's qparams, and which ops stay float and why."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.passes.qdq.placement import plan


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.max_pool2d(a + self.c2(a), 2)  # add unit, then a pass-through
        c = torch.sigmoid(b)  # float
        return self.fc(torch.flatten(c, 1))


def _plan(model, x):
    g = graphopt.trace(model.eval(), (x,))
    return g, plan(g.module)


def test_units_fuse_the_clamping_activation():
    g, p = _plan(Block(), torch.randn(1, 3, 8, 8))
    kinds = {u.op.name: u.kind for u in p.units}
    assert kinds == {"c1": "conv", "c2": "conv", "add": "add", "fc": "linear"}, kinds
    c1 = next(u for u in p.units if u.op.name == "c1")
    assert c1.act is not None and c1.act.name == "relu" and c1.out is c1.act
    assert c1.bounds == (0.0, float("inf"))


def test_pass_through_shares_and_float_ops_are_reported():
    g, p = _plan(Block(), torch.randn(1, 3, 8, 8))
    shared = {v.name: root.name for v, root in p.shared.items()}
    assert shared.get("max_pool2d") == "add", shared
    floats = {f["node"]: f["reason"] for f in p.float_ops}
    assert "sigmoid" in floats and floats["sigmoid"], floats
    # the add's inputs are quantized (ORT needs DQ on both), the linear's input too
    assert {v.name for v in p.own} == {"x", "relu", "c2", "add", "flatten"}


def test_skip_glob_keeps_a_layer_float():
    g = graphopt.trace(Block().eval(), (torch.randn(1, 3, 8, 8),))
    p = plan(g.module, skip=("c2",))
    assert "c2" not in {u.op.name for u in p.units}
    assert any(s["node"] == "c2" for s in p.skipped), p.skipped


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(4, 4, 1)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(self.conv(self.pre(x)))


def test_a_module_called_twice_is_not_a_unit():
    g, p = _plan(Shared(), torch.randn(1, 4, 4, 4))
    assert [u.op.name for u in p.units] == ["pre"]
    reasons = {f["node"]: f["reason"] for f in p.float_ops}
    assert reasons == {"conv": "conv module called at several places"}, reasons


class SigmoidHead(nn.Module):
    """A multi-label head: the logits go through a sigmoid to the output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return torch.sigmoid(self.head(torch.relu(self.body(x))))


def test_logits_before_a_sigmoid_head_stay_float():
    g, p = _plan(SigmoidHead(), torch.randn(2, 6))
    assert [v.name for v in p.float_outputs] == ["head"]
    assert "head" not in {v.name for v in p.own}  # no int8 step before the sigmoid
    assert "sigmoid" not in {f["node"] for f in p.float_ops}  # nothing quantized around it


def test_qdq_on_a_sigmoid_head_exports_float_logits(tmp_path):
    import onnx

    from graphopt.backends.onnxruntime import export

    torch.manual_seed(0)
    model = SigmoidHead().eval()
    data = [torch.randn(32, 6) for _ in range(4)]
    g = graphopt.trace(model, (data[0][:1],))
    result = graphopt.Pipeline.parse("qdq").run(g, data=data)
    proto = onnx.load(str(export(result.graph, tmp_path / "head.onnx")))
    producer = {o: n for n in proto.graph.node for o in n.output}
    (sig,) = [n for n in proto.graph.node if n.op_type == "Sigmoid"]
    before = producer[sig.input[0]]
    assert before.op_type != "DequantizeLinear", before.op_type  # no int8 step on the logits
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)  # the body is int8
