"""SmoothQuant: exact in float, and int8 closer to float on activations with outlier channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.passes.qdq.smooth import smooth, smoothable


class Block(nn.Module):
    """LayerNorm feeding q/k/v-like linears, with two outlier channels (as in transformers)."""

    def __init__(self, d=32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, 8)
        with torch.no_grad():
            self.ln.weight[:2] = 60.0  # outliers

    def forward(self, x):
        h = self.ln(x)
        return self.out(torch.relu(self.q(h)) * torch.sigmoid(self.k(h)) + self.v(h))


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 16, 32, generator=g) for _ in range(4)]


def test_smoothing_alone_is_exact_in_float():
    torch.manual_seed(0)
    model = Block().eval()
    g = graphopt.trace(model, (_data()[0][:1],))
    (pair,) = smoothable(g.module)
    assert pair[0].target == "ln" and sorted(str(u.target) for u in pair[1]) == ["k", "q", "v"]
    done = smooth(g.module, [(x,) for x in _data()], alpha=0.5)
    assert done[0]["activation_range_after"] < done[0]["activation_range_before"] / 5
    x = torch.randn(4, 16, 32)
    torch.testing.assert_close(g.module(x), model(x), rtol=1e-4, atol=1e-4)


def _sqnr(model, text):
    g = graphopt.trace(model, (_data()[0][:1],))
    result = graphopt.Pipeline.parse(text).run(g, data=_data())
    x = torch.randn(64, 16, 32, generator=torch.Generator().manual_seed(5))
    ref, got = model(x), result.graph.module(x)
    return 10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()).item(), result


def test_smoothquant_helps_dynamic_int8_on_outlier_channels():
    torch.manual_seed(0)
    model = Block().eval()
    plain, _ = _sqnr(model, "qdq(activations=dynamic)")
    smoothed, result = _sqnr(model, "qdq(activations=dynamic,smooth=0.5)")
    assert result.reports[0].details["smooth"][0]["layernorm"] == "ln"
    assert smoothed > plain + 3.0, (plain, smoothed)


def test_smooth_option_checks():
    with pytest.raises(graphopt.OptionError, match="smooth"):
        graphopt.Pipeline.parse("qdq(smooth=1.5)")
    assert graphopt.Pipeline.parse("qdq(activations=dynamic,smooth=0.5)").uses_data()
    assert not graphopt.Pipeline.parse("qdq(activations=dynamic)").uses_data()
