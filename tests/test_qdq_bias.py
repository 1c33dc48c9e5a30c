"""Bias correction against the float model (``qdq(bias-correction=true)``, the default).

- the mean shift that *activation* rounding causes (here small ReLU outputs rounded to zero on
  a coarse step, with weights that int8 represents exactly, so weight rounding causes none) is
  removed on *held-out* inputs, which a correction of the weights' own rounding error cannot do;
- a layer whose true mean shift is zero (zero-mean input rounding, exact weights) and whose
  noise is large gets (almost) no correction: the calibration mean of its noise is not a shift,
  and adding it to the bias would add error on new inputs;
- the shrinkage ``w = max(0, 1 - 1/t^2)`` itself: nothing for noise, nearly all of a real
  shift, and a smaller error of the estimate than the raw mean."""

from __future__ import annotations

import torch
import torch.nn as nn

import graphopt
from graphopt.manager import Pipeline
from graphopt.passes.qdq.bias import shrinkage


def _run(model, data, text):
    return graphopt.compress(model, Pipeline.parse(text), (data[0][:1],), data=data)


def _exact(layer: nn.Linear, q: torch.Tensor, step: float = 0.004) -> None:
    """Weights ``q * step`` with ``q`` integers and 127 in each row: per-channel int8 holds them
    exactly (no weight rounding)."""
    with torch.no_grad():
        layer.weight.copy_(q.float() * step)
        layer.bias.zero_()


class Quiet(nn.Module):
    """``a``'s channel 0 is loud, so the ReLU output's uint8 step is coarse and the quiet
    channels' small positive values mostly round to zero: a negative mean shift that ``fc``
    (positive weights) adds up coherently."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.a(x)))


def _quiet() -> nn.Module:
    g = torch.Generator().manual_seed(1)
    model = Quiet().eval()
    q = torch.randint(-60, 61, (8, 16), generator=g)
    q[:, 0] = 127
    _exact(model.a, q)
    with torch.no_grad():
        model.a.weight[0] *= 400  # still exact: its own per-channel scale
    q = torch.randint(1, 61, (4, 8), generator=g)
    q[:, 0], q[:, 1] = 0, 127
    _exact(model.fc, q)
    return model


def test_corrects_the_mean_shift_of_activation_rounding_on_new_inputs():
    model = _quiet()
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(32, 16, generator=g) for _ in range(4)]
    held_out = torch.randn(8192, 16, generator=g)
    plain = _run(model, data, "qdq(bias-correction=false,target=vnni)")
    fixed = _run(model, data, "qdq(target=vnni)")
    with torch.no_grad():
        ref = model(held_out)
        err_plain = plain.graph.module(held_out) - ref
        err_fixed = fixed.graph.module(held_out) - ref
    # a real shift (about 0.34 per output) that the corrected model no longer has on inputs
    # it was not calibrated on
    assert err_plain.mean(0).abs().min() > 0.2, err_plain.mean(0)
    assert err_fixed.mean(0).abs().max() < 0.25 * err_plain.mean(0).abs().min()
    assert err_fixed.pow(2).mean() < 0.7 * err_plain.pow(2).mean()
    corrections = fixed.reports[-1].details["bias_correction"]
    assert set(corrections) == {"a", "fc"}, corrections
    assert corrections["fc"]["weight"] > 0.95 and corrections["fc"]["dropped"] == 0, corrections
    assert "bias_correction" not in plain.reports[-1].details


def test_no_correction_for_a_layer_whose_error_is_noise():
    """Exact weights and zero-mean inputs: rounding the input adds noise with no mean, so the
    16 calibration samples' mean error is about one standard error, not a shift."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    q = torch.randint(-60, 61, (32, 64), generator=g)
    q[:, 0] = 127
    _exact(model[0], q)
    data = [torch.randn(8, 64, generator=g) for _ in range(2)]
    held_out = torch.randn(8192, 64, generator=g)
    plain = _run(model, data, "qdq(bias-correction=false,target=vnni)")
    fixed = _run(model, data, "qdq(target=vnni)")
    report = fixed.reports[-1].details["bias_correction"]["0"]
    # a full correction (w = 1) would shift every channel by its noise
    assert report["dropped"] >= 16 and report["weight"] < 0.4, report
    with torch.no_grad():
        ref = model(held_out)
        mse_plain = (plain.graph.module(held_out) - ref).pow(2).mean()
        mse_fixed = (fixed.graph.module(held_out) - ref).pow(2).mean()
        bias_moved = fixed.graph.module.get_submodule("0").dequantized_bias() - (
            plain.graph.module.get_submodule("0").dequantized_bias()
        )
    assert mse_fixed < 1.02 * mse_plain, (mse_fixed, mse_plain)
    assert (bias_moved == 0).sum() >= 16


def test_shrinkage_keeps_real_shifts_and_drops_noise():
    """512 channels of pure noise and 512 with a shift of ten standard errors, 64 samples."""
    g = torch.Generator().manual_seed(0)
    n = 64
    errors = torch.randn(n, 1024, generator=g, dtype=torch.float64)
    mu = torch.zeros(1024, dtype=torch.float64)
    mu[512:] = 10 / n**0.5
    d, w = shrinkage(errors + mu)
    assert d.shape == w.shape == (1024,)
    # noise: |t| <= 1 (about 68% of channels) gets nothing, the rest little (mean w ~0.16)
    assert (w[:512] == 0).double().mean() > 0.6 and w[:512].mean() < 0.25, w[:512]
    assert (w[512:] > 0.9).all(), w[512:].min()
    # the point of it: the shrunk estimate is closer to the true shift than the raw mean
    assert ((w * d - mu) ** 2).sum() < 0.8 * ((d - mu) ** 2).sum()
    # one sample: no standard error, the whole mean
    d1, w1 = shrinkage(torch.tensor([[0.5, -0.25]], dtype=torch.float64))
    assert torch.equal(w1, torch.ones(2, dtype=torch.float64)) and torch.equal(d1, d1)
    # no spread: a certain shift
    assert torch.equal(shrinkage(torch.full((4, 3), 0.1, dtype=torch.float64))[1], torch.ones(3))
