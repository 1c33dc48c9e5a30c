"""AdaRound: learned rounding lowers each layer's output error against nearest rounding,
keeps the weight scales, and the integer model still runs exactly in ORT."""

from __future__ import annotations

import torch
import torch.nn as nn

import graphopt
from graphopt.passes.qdq.adaround import adaround_layer
from graphopt.quant.modules import QATConv

from .test_qdq_sensitivity import Net  # a 3-layer conv net


def test_learned_rounding_beats_nearest_on_a_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = QATConv(conv, per_channel=True, weight_qmax=15)  # coarse steps: rounding matters
    scale = layer.current_weight_scale().clone()
    # correlated channels, as real activations are (with white inputs nearest is optimal)
    z = torch.randn(64, 2, 6, 6)
    x = torch.einsum("bchw,dc->bdhw", z, torch.randn(8, 2)) + 0.1 * torch.randn(64, 8, 6, 6)
    gain = adaround_layer(layer, x, iters=300)
    assert gain > 0.3, gain  # removes a third of nearest rounding's output error (0.64 here)
    torch.testing.assert_close(layer.current_weight_scale(), scale)  # scales unchanged
    steps = layer.weight / scale.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)  # on the int grid


def test_qdq_rounding_adaround_runs_and_reports(tmp_path):
    from graphopt.backends.onnxruntime import check_parity, export

    torch.manual_seed(0)
    data = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    g = graphopt.trace(Net().eval(), (data[0][:1],))
    result = graphopt.Pipeline.parse("qdq(rounding=adaround,rounding-iters=50)").run(g, data=data)
    gains = result.reports[0].details["adaround_error_removed"]
    assert set(gains) == {"a", "b", "fc"} and all(v >= 0 for v in gains.values())
    parity = check_parity(result.graph, export(result.graph, tmp_path / "q.onnx"))
    assert parity["rel"] < 1e-3, parity
