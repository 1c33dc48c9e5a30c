"""``prune(importance=activation)``: units scored by the mean square of what they feed the
layers reading them, on data (for attention heads, the attention-output norm; the head tests
are in ``test_prune_heads.py``).

Ground truths: the scores equal a hand computation of ``E[x_j²]``; a channel that is exactly
zero on every input (a dead ReLU, a head with zero values) scores 0 and is the one removed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import graphopt
from graphopt.channels import ChannelAnalysis
from graphopt.errors import DataError
from graphopt.pass_api import PassContext
from graphopt.passes.prune.activation import activation_scores


def test_scores_are_the_mean_square_of_the_input_each_weight_reads():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = graphopt.trace(net, torch.randn(2, 6))
    data = [(torch.randn(5, 6),) for _ in range(3)]
    ca = ChannelAnalysis(g)
    acts = activation_scores(g, PassContext(data=data), 2, ca)  # the first 2 batches
    with torch.no_grad():
        h = torch.cat([net[1](net[0](b)) for (b,) in data[:2]]).double()
    assert set(acts) == {("2", "weight")}  # only the second Linear reads pruned channels
    np.testing.assert_allclose(acts[("2", "weight")], (h * h).mean(0).numpy(), rtol=1e-12)


def test_a_dead_channel_of_a_torchvision_resnet_goes_first():
    """Channel 5 of layer1.0.conv1 is zero after its batch norm and ReLU on any input, so
    its activation score is 0: with one channel per group removed, it is that one."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    with torch.no_grad():
        model.layer1[0].bn1.weight[5] = 0.0
        model.layer1[0].bn1.bias[5] = -1.0
    g = graphopt.trace(model, torch.randn(1, 3, 32, 32))
    data = [(torch.randn(2, 3, 32, 32),) for _ in range(2)]
    r = graphopt.Pipeline.parse("prune(ratio=0.02,importance=activation)").run(g, data=data)
    plan = r.reports[0].details["plan"]["rounds"][0]["members"]
    conv1 = next(
        e for e in plan if (e["owner"], e["param"], e["dim"]) == ("layer1.0.conv1", "weight", 0)
    )
    assert conv1["removed"] == [5]
    assert r.graph.module.get_submodule("layer1.0.conv2").in_channels == 63


class _MHANet(nn.Module):
    """``nn.MultiheadAttention`` kept as one leaf by fx: its output projection runs inside."""

    def __init__(self, e: int = 32, h: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, h, batch_first=True)
        self.fc = nn.Linear(e, 5)

    def forward(self, x):
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(y + x)


def test_multihead_attention_leaf_heads_scored_by_their_outputs():
    torch.manual_seed(0)
    net = _MHANet().eval()
    x = torch.randn(2, 6, 32)
    g = graphopt.trace(net, x, frontend="fx")
    assert any(n.op == "call_module" and n.target == "attn" for n in g.module.graph.nodes)
    attn = g.module.get_submodule("attn")
    with torch.no_grad():  # head 1 (rows 8..15 of v) outputs zero on any input
        attn.in_proj_weight[64 + 8 : 64 + 16] = 0.0
        attn.in_proj_bias[64 + 8 : 64 + 16] = 0.0
        ref = g.module(x)
    data = [(torch.randn(3, 6, 32),) for _ in range(2)]
    r = graphopt.Pipeline.parse("prune(ratio=0.25,units=heads,importance=activation)").run(
        g, data=data
    )
    plan = r.reports[0].details["plan"]["rounds"][0]["members"]
    out = next(e for e in plan if e["owner"] == "attn.out_proj" and e["dim"] == 1)
    assert out["removed"] == list(range(8, 16))
    with torch.no_grad():
        torch.testing.assert_close(r.graph.module(x), ref, rtol=1e-5, atol=1e-6)


def test_needs_data():
    g = graphopt.trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(),
                       torch.randn(1, 4))  # fmt: skip
    with pytest.raises(DataError, match="needs data"):
        graphopt.Pipeline.parse("prune(importance=activation)").run(g)
