"""One cost model for float, quantized and recurrent graphs: MACs agree with
torch.utils.flop_counter where it sees everything, and are not zero where it does not."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import graphopt


def _flops_macs(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model(x)
    return c.get_total_flops() // 2


def test_float_cnn_matches_the_flop_counter():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8)
    cost = graphopt.cost_of(graphopt.trace(model.eval(), x))
    assert cost.macs == _flops_macs(model, x) == 2 * (8 * 3 * 9 * 36 + 8 * 36 * 5)
    assert cost.params == sum(p.numel() for p in model.parameters())


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(6, 10, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(20, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


def test_recurrent_layers_are_counted():
    x = torch.randn(2, 7, 6)
    for cell, gates in ((nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)):
        model = Recurrent(cell).eval()
        g = graphopt.trace(model, x, leaf_modules=["rnn"])
        layer = next(lc for lc in graphopt.cost_of(g).layers if lc.path == "rnn")
        steps, dirs, h = 2 * 7, 2, 10
        want = dirs * steps * gates * ((6 * h + h * h) + (2 * h * h + h * h))
        assert layer.macs == want, cell.__name__


def test_transformer_encoder_is_not_zero():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    x = torch.randn(1, 5, 16)
    g = graphopt.trace(model, x, leaf_modules=[nn.TransformerEncoder])
    macs = graphopt.cost_of(g).macs
    linear = 2 * 5 * (16 * 48 + 16 * 16 + 16 * 32 * 2)  # in-proj, out-proj, FFN, per layer
    assert macs >= linear


def test_dynamic_int8_keeps_linear_macs_and_biases():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    g = graphopt.trace(model, x)
    before = graphopt.cost_of(g)
    graphopt.Pipeline.parse("qdq(activations=dynamic)").run(g)
    after = graphopt.cost_of(g)
    assert after.macs == before.macs == 3 * (8 * 16 + 16 * 4)
    assert after.params == before.params  # int8 weights and float biases, as many as before
    assert after.bytes < before.bytes / 2
