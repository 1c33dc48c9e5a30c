"""Quantization parameters and calibration observers against known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from graphopt.errors import DataError
from graphopt.quant.observers import (
    RangeObserver,
    affine_qparams,
    entropy_threshold,
    quantize_weight,
    sqnr_db,
    weight_qparams,
)


def _observe(method: str, batches, **kw) -> tuple[float, float]:
    obs = RangeObserver(method, **kw)
    for b in batches:
        obs.observe(b)
    if obs.needs_histograms:
        obs.start_histograms()
        for b in batches:
            obs.observe(b)
    return obs.range()


@pytest.fixture
def gaussian():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(50_000, generator=g) for _ in range(8)]


def test_minmax_is_the_exact_range():
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(1000, generator=g) * 3 - 1 for _ in range(5)]
    lo, hi = _observe("minmax", batches)
    assert lo == pytest.approx(min(float(b.min()) for b in batches))
    assert hi == pytest.approx(max(float(b.max()) for b in batches))


def test_percentile_of_a_gaussian(gaussian):
    # the 99.9th percentile of N(0, 1) is 3.090, the 99th 2.326
    lo, hi = _observe("percentile", gaussian, percentile=99.9)
    assert hi == pytest.approx(3.090, abs=0.03)
    assert lo == pytest.approx(-3.090, abs=0.03)
    lo, hi = _observe("percentile", gaussian, percentile=99.0)
    assert hi == pytest.approx(2.326, abs=0.02)


def test_percentile_keeps_relu_zero(gaussian):
    lo, hi = _observe("percentile", [torch.relu(b) for b in gaussian], percentile=99.9)
    assert lo == 0.0
    assert hi == pytest.approx(3.09, abs=0.04)  # the zeros do not move the upper tail


def test_mse_clips_a_gaussian_near_the_optimum(gaussian):
    # the MSE-optimal 8-bit clipping of N(0, 1) is near 4 sigma (Banner et al.: ~3.9 for
    # symmetric 8 bits); never the full range of the sample
    lo, hi = _observe("mse", gaussian)
    mx = max(float(b.abs().max()) for b in gaussian)
    assert 3.0 < hi < 4.8 and -4.8 < lo < -3.0
    assert hi < mx


def _expected_mse(x: torch.Tensor, lo: float, hi: float) -> float:
    qp = affine_qparams(lo, hi)
    q = torch.clamp(torch.round(x / qp.scale) + qp.zero_point, 0, 255)
    return float(((q - qp.zero_point) * qp.scale - x).pow(2).mean())


def test_mse_range_beats_minmax_and_percentile(gaussian):
    x = torch.cat(gaussian)
    mse = _expected_mse(x, *_observe("mse", gaussian))
    assert mse < _expected_mse(x, *_observe("minmax", gaussian))
    assert mse < _expected_mse(x, *_observe("percentile", gaussian, percentile=99.0))


def test_entropy_ignores_a_lone_outlier(gaussian):
    lo, hi = _observe("entropy", gaussian)
    assert 3.0 < hi < 6.0 and -6.0 < lo < -3.0
    # the outlier stretches the 2048 histogram bins to 0.5 wide, and KL keeps at least 128
    # bins: the threshold is 64 at most, 16x below min/max
    batches = [*gaussian, torch.tensor([1000.0])]
    assert _observe("entropy", batches)[1] <= 64.0
    assert _observe("minmax", batches)[1] == 1000.0
    assert _observe("percentile", batches)[1] < 8.0


def test_entropy_threshold_of_uniform_is_the_maximum():
    # nothing to gain by clipping a uniform distribution
    hist = np.full(2048, 100.0)
    assert entropy_threshold(hist, 1.0, 128) == pytest.approx(1.0, abs=0.02)


def test_entropy_falls_back_to_minmax_on_few_samples():
    x = torch.linspace(-1, 1, 200)
    assert _observe("entropy", [x]) == pytest.approx((-1.0, 1.0))


def test_histograms_are_memory_bounded():
    obs = RangeObserver("mse")
    obs.observe(torch.randn(1000))
    obs.start_histograms()
    for _ in range(20):
        obs.observe(torch.randn(100_000))
    assert obs.hist.numel() == 2048 and obs.abs_hist.numel() == 2048


def test_nan_and_inf_name_the_node():
    obs = RangeObserver("minmax", where="node 'conv1' (module 'features.0')")
    with pytest.raises(DataError, match=r"NaN values at node 'conv1' \(module 'features.0'\)"):
        obs.observe(torch.tensor([1.0, float("nan")]))
    with pytest.raises(DataError, match="inf values"):
        obs.observe(torch.tensor([1.0, float("inf")]))


# -- qparams -----------------------------------------------------------------------------------
def test_affine_qparams_uint8():
    qp = affine_qparams(-1.0, 3.0)
    assert qp.scale == pytest.approx(4.0 / 255)
    assert qp.zero_point == round(1.0 / qp.scale)
    assert qp.lo <= -1.0 + qp.scale and qp.hi >= 3.0 - qp.scale
    qp8 = affine_qparams(-1.0, 3.0, torch.int8)
    assert qp8.scale == qp.scale and qp8.zero_point == qp.zero_point - 128


def test_range_is_widened_to_contain_zero():
    qp = affine_qparams(2.0, 4.0)
    assert qp.zero_point == 0 and qp.scale == pytest.approx(4.0 / 255)
    qp = affine_qparams(-4.0, -2.0)
    assert qp.zero_point == 255


@pytest.mark.parametrize("value", [0.0, 1e-30, -1e-30])
def test_constant_activation_gets_a_safe_scale(value):
    qp = affine_qparams(value, value)
    assert qp.scale == 1.0 and 0 <= qp.zero_point <= 255
    assert math.isfinite(qp.scale)


def test_constant_nonzero_activation_is_exact():
    qp = affine_qparams(2.5, 2.5)
    q = round(2.5 / qp.scale) + qp.zero_point
    assert q == 255 and (q - qp.zero_point) * qp.scale == pytest.approx(2.5, rel=1e-6)


def test_relu_bounds_give_zero_point_qmin():
    for dtype, qmin in ((torch.uint8, 0), (torch.int8, -128)):
        qp = affine_qparams(0.0, 5.0, dtype, bounds=(0.0, math.inf))
        assert qp.zero_point == qmin


def test_relu6_bounds_keep_the_representable_range_inside_the_clip():
    # ORT drops the Clip before a QuantizeLinear only if s * (qmax - z) <= 6 in float32
    for hi in (6.0, 7.5, 5.9999):
        qp = affine_qparams(-0.5, hi, bounds=(0.0, 6.0))
        assert qp.zero_point == 0
        assert float(np.float32(qp.scale) * np.float32(255)) <= 6.0


def test_per_channel_weight_scales_reproduce_weights_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.linspace(0.01, 3, 16)[:, None, None, None]
    w[3] = 0.0  # an all-zero channel
    s = weight_qparams(w, per_channel=True)
    q = quantize_weight(w, s)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert s[3] == 1.0 and torch.all(q[3] == 0)
    amax = w.abs().flatten(1).amax(1)
    keep = amax > 0
    assert torch.allclose(s[keep], (amax[keep] / 127).float())
    err = (w - q.float() * s[:, None, None, None]).abs().flatten(1).amax(1)
    assert torch.all(err <= s / 2 * (1 + 1e-5))


def test_sqnr():
    x = torch.ones(100)
    assert sqnr_db(x, x) is None
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0, abs=1e-4)  # noise 0.01 per element
