"""Bias correction against the float model (``qdq(bias-correction=true)``, the default):
the mean shift that *activation* rounding causes (here through a max-pool over rounded values,
with weights that int8 represents exactly, so weight rounding causes none) is removed, which a
correction of the weights' own rounding error cannot do; the layers are corrected in order and
the last layer's mean output per channel ends equal to the float model's."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.manager import Pipeline


class PoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(1, 8, 5, padding=2)
        self.b = nn.Conv1d(8, 8, 5, padding=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.max_pool1d(torch.relu(self.a(x)), 4)
        x = F.max_pool1d(torch.relu(self.b(x)), 4)
        return self.fc(x.mean(-1))


def _exact_int8(model: nn.Module) -> nn.Module:
    """Weights that per-channel int8 (127 steps) represents exactly: no weight rounding."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (model.a, model.b, model.fc):
            q = torch.randint(-60, 61, m.weight.shape, generator=g).float()
            q.view(q.shape[0], -1)[:, 0] = 127.0  # the channel's largest magnitude: 127 steps
            m.weight.copy_(q * 0.004)
    return model.eval()


def _run(model, data, text):
    return graphopt.compress(model, Pipeline.parse(text), (data[0][:1],), data=data)


def test_corrects_the_mean_shift_of_activation_rounding():
    torch.manual_seed(0)
    model = _exact_int8(PoolNet())
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 1, 128, generator=g) for _ in range(4)]
    x = torch.cat(data)
    plain = _run(model, data, "qdq(bias-correction=false,target=vnni)")
    fixed = _run(model, data, "qdq(target=vnni)")
    with torch.no_grad():
        ref = model(x)
        shift_plain = (plain.graph.module(x) - ref).mean(0).abs()
        shift_fixed = (fixed.graph.module(x) - ref).mean(0).abs()
        noise_plain = (plain.graph.module(x) - ref).pow(2).mean()
        noise_fixed = (fixed.graph.module(x) - ref).pow(2).mean()
    # weights are exact, so the whole shift comes from rounding activations; the float
    # model's output is matched on the calibration data (float logits: no output rounding)
    assert shift_fixed.max() < 0.35 * shift_plain.max(), (shift_fixed, shift_plain)
    assert noise_fixed < noise_plain
    corrections = fixed.reports[-1].details["bias_correction"]
    assert set(corrections) == {"a", "b", "fc"}, corrections
    assert "bias_correction" not in plain.reports[-1].details
