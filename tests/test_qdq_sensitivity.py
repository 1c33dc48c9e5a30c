"""Per-layer sensitivity names the layer that quantizes worst."""

from __future__ import annotations

import torch
import torch.nn as nn

import graphopt
from graphopt.passes.qdq.sensitivity import quant_sensitivity


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h))
        return self.fc(h.mean((2, 3)))


def test_the_layer_with_an_outlier_weight_is_the_most_sensitive():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.b.weight[0, 0, 0, 0] = 40.0  # one huge weight: per-tensor int8 crushes the rest
    data = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    g = graphopt.trace(model, (data[0][:1],))
    rows = quant_sensitivity(g, data, options="weights=per-tensor")
    assert [r["layer"] for r in rows][0] == "b", rows
    assert {r["layer"] for r in rows} == {"a", "b", "fc"}
    assert all(r["sqnr_db"] is None or r["sqnr_db"] > 0 for r in rows)
    assert rows[0]["sqnr_db"] < rows[-1]["sqnr_db"] - 6
    # the graph measured is untouched
    assert isinstance(g.module.b, nn.Conv2d)
