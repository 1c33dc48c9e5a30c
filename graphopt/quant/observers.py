"""Quantization parameters and the observers that choose them from calibration data.

Affine quantization maps a real ``r`` to an integer ``q = clamp(round(r / s) + z, qmin, qmax)``
and back to ``r' = s (q - z)``. Activations use asymmetric ranges: for a calibrated range
``[lo, hi]`` (widened to contain 0, so that 0 is exact) ``s = (hi - lo) / (qmax - qmin)`` and
``z = clamp(round(qmin - lo / s), qmin, qmax)``. Weights use symmetric int8 in ``[-127, 127]``
with ``z = 0`` and ``s = max|w| / 127`` per output channel (or per tensor).

Observers see calibration batches and produce the range ``[lo, hi]``:

- ``minmax``: the smallest and largest value seen;
- ``percentile``: the ``p``-th and ``(100 - p)``-th percentiles;
- ``mse``: the clipping range minimising the expected squared quantization error
  ``E[(x - Q(x))^2]``, with in-range error ``s^2 / 12`` and clipped error ``(x - clip(x))^2``;
- ``entropy``: the threshold ``T`` minimising ``KL(P || Q)`` between the histogram of ``|x|``
  clipped at ``T`` and its quantized version (TensorRT's calibration), range ``[-T, T]``
  intersected with the observed range. Exact zeros are left out of the histogram: they are
  exact at any range, and ReLU's spike at 0 would otherwise pull ``T`` far down.

The histogram methods keep two fixed-size histograms (2048 bins) per observed tensor: memory is
bounded whatever the number of batches. They need the tensor's range before the first bin is
filled, so calibration makes two passes over the data (min/max first, histograms second).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from graphopt.errors import DataError

METHODS = ("minmax", "percentile", "mse", "entropy")
HIST_BINS = 2048
# Scales below this are meaningless for float32 activations (and risk denormals): such a
# tensor is treated as constant.
MIN_SCALE = 1e-12

_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


@dataclass(frozen=True)
class QParams:
    """``r' = scale * (clamp(round(r / scale) + zero_point, qmin, qmax) - zero_point)``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    dtype: torch.dtype

    @property
    def lo(self) -> float:
        """The smallest representable real value."""
        return self.scale * (self.qmin - self.zero_point)

    @property
    def hi(self) -> float:
        """The largest representable real value."""
        return self.scale * (self.qmax - self.zero_point)

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "scale": self.scale,
            "zero_point": self.zero_point,
            "dtype": str(self.dtype).replace("torch.", ""),
        }


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (scales are stored as float32 in ONNX)."""
    return float(np.float32(x))


def affine_qparams(
    lo: float,
    hi: float,
    dtype: torch.dtype = torch.uint8,
    bounds: tuple[float, float] | None = None,
) -> QParams:
    """Asymmetric qparams for the range ``[lo, hi]`` (widened to contain 0).

    ``bounds = (a, b)`` is the range of a clamping activation fused before the quantizer (ReLU:
    ``(0, inf)``, ReLU6: ``(0, 6)``): the range is cut to it, and the float32 scale is nudged
    down until the representable range ``[s (qmin - z), s (qmax - z)]`` lies inside ``[a, b]``,
    which is what lets ONNX Runtime drop the activation (its Relu/Clip + QuantizeLinear fusion).
    A constant tensor (range 0) gets ``s = 1``, never a division by zero.
    """
    qmin, qmax = _QRANGE[dtype]
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"range [{lo}, {hi}] is not finite")
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        hi = max(hi, lo)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (qmax - qmin)
    if scale < MIN_SCALE:
        return QParams(1.0, qmin if lo >= 0 else (qmin + qmax + 1) // 2, qmin, qmax, dtype)
    scale = f32(scale)
    zp = int(min(qmax, max(qmin, round(qmin - lo / scale))))
    if bounds is not None:
        a, b = bounds
        if lo >= 0.0 and a >= 0.0:
            zp = qmin  # exactly: ORT drops a Relu/Clip only when the zero point is qmin
        for _ in range(64):
            s32 = np.float32(scale)
            up = float(s32 * np.float32(qmax - zp))
            down = float(s32 * np.float32(qmin - zp))
            if up <= b and down >= a:
                break
            scale = float(np.nextafter(s32, np.float32(0)))
    return QParams(scale, zp, qmin, qmax, dtype)


def weight_qparams(w: torch.Tensor, per_channel: bool = True, qmax: int = 127) -> torch.Tensor:
    """Symmetric int8 weight scales ``max|w| / qmax`` (float32; ``qmax`` 127, or 63 for
    :mod:`graphopt.cpu`'s ``avx2`` target): one per output channel (axis 0) or a 1-element
    tensor. An all-zero channel gets scale 1."""
    w = w.detach().float()
    amax = w.abs().flatten(1).amax(1) if per_channel else w.abs().amax().reshape(1)
    scale = (amax.double() / float(qmax)).float()
    return torch.where(scale < MIN_SCALE, torch.ones_like(scale), scale)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """``clamp(round(w / s), -qmax, qmax)`` as int8, ``s`` broadcast along axis 0."""
    s = scale.reshape(-1, *([1] * (w.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
    return torch.clamp(torch.round(w.detach().float() / s), -qmax, qmax).to(torch.int8)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float | None:
    """Signal-to-quantization-noise ratio ``10 log10(sum r^2 / sum (r - a)^2)`` in dB;
    ``None`` when it is not a finite number (the two are identical, or the reference is 0)."""
    r = reference.detach().double()
    noise = (r - approx.detach().double()).pow(2).sum().item()
    signal = r.pow(2).sum().item()
    if noise == 0.0 or signal == 0.0:
        return None
    return 10.0 * math.log10(signal / noise)


# -- observers ----------------------------------------------------------------------------------
class RangeObserver:
    """Collects what a calibration method needs about one tensor and gives its range.

    ``observe(x)`` during pass 1 tracks min/max; for the histogram methods
    ``start_histograms()`` then fixes the bins and ``observe(x)`` during pass 2 fills them.
    ``where`` names the node, for errors (NaN/inf in the data).
    """

    def __init__(self, method: str = "minmax", percentile: float = 99.99, where: str = ""):
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}; use {', '.join(METHODS)}")
        self.method = method
        self.percentile = percentile
        self.where = where
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.hist: torch.Tensor | None = None  # signed values over [min, max]
        self.abs_hist: torch.Tensor | None = None  # |x| > 0 over [0, max(|min|, |max|)]

    @property
    def needs_histograms(self) -> bool:
        return self.method != "minmax"

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not x.is_floating_point():
            return
        x = x.float()
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "inf"
            raise DataError(
                f"calibration saw {bad} values at {self.where or 'a quantized tensor'}; check the "
                "calibration data and the model's numerics before quantizing"
            )
        if self.hist is None:
            self.min = min(self.min, float(x.min()))
            self.max = max(self.max, float(x.max()))
            self.count += x.numel()
            return
        lo, hi = self.min, self.max
        if hi > lo:
            self.hist += torch.histc(x.clamp(lo, hi), HIST_BINS, lo, hi).double()
        amax = max(abs(lo), abs(hi))
        if amax > 0:
            # exact zeros (ReLU's spike) are exact in any range: KL ignores them
            mag = x.abs()
            mag = mag[mag > 0]
            self.abs_hist += torch.histc(mag.clamp(max=amax), HIST_BINS, 0.0, amax).double()

    def start_histograms(self) -> None:
        """End pass 1 (min/max known): allocate the histograms that pass 2 fills."""
        self.hist = torch.zeros(HIST_BINS, dtype=torch.float64)
        self.abs_hist = torch.zeros(HIST_BINS, dtype=torch.float64)

    def range(self, qmin: int = 0, qmax: int = 255) -> tuple[float, float]:
        """The calibrated ``(lo, hi)``; ``(0, 0)`` for a tensor never observed."""
        if self.count == 0:
            return 0.0, 0.0
        lo, hi = self.min, self.max
        if self.method == "minmax" or hi <= lo or self.hist is None:
            return lo, hi
        hist = self.hist.numpy()
        if self.method == "percentile":
            return percentile_range(hist, lo, hi, self.percentile)
        if self.method == "mse":
            return mse_range(hist, lo, hi, qmax - qmin)
        amax = max(abs(lo), abs(hi))
        levels = (qmax - qmin) if lo >= 0 else (qmax - qmin + 1) // 2
        # KL on a sparse histogram favours tiny thresholds: keep >= 16 values per bin on
        # average, and fall back to min/max when that leaves fewer bins than levels
        bins = HIST_BINS
        while bins > levels and self.count < 16 * bins:
            bins //= 2
        if bins <= levels:
            return lo, hi
        hist = self.abs_hist.numpy().reshape(bins, HIST_BINS // bins).sum(1)
        t = entropy_threshold(hist, amax, levels)
        return max(lo, -t), min(hi, t)


def _centers(lo: float, hi: float, n: int) -> np.ndarray:
    width = (hi - lo) / n
    return lo + width * (np.arange(n) + 0.5)


def percentile_range(hist: np.ndarray, lo: float, hi: float, p: float) -> tuple[float, float]:
    """``(q_{100-p}, q_p)`` of the histogrammed distribution over ``[lo, hi]`` (linear inside
    a bin)."""
    if not 50.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {p}")
    total = hist.sum()
    if total <= 0:
        return lo, hi
    cdf = np.concatenate([[0.0], np.cumsum(hist)]) / total
    edges = np.linspace(lo, hi, len(hist) + 1)
    upper = float(np.interp(p / 100.0, cdf, edges))
    lower = float(np.interp(1.0 - p / 100.0, cdf, edges))
    # a lone value at an end (ReLU's zeros, say) keeps its end of the range
    return (lo if cdf[1] >= 1.0 - p / 100.0 else lower), (hi if cdf[-2] <= p / 100.0 else upper)


def mse_range(
    hist: np.ndarray, lo: float, hi: float, steps: int, grid: int = 64
) -> tuple[float, float]:
    """The clipping range ``[a, b]`` (a grid over ``a in (lo..0]``, ``b in [0..hi)``) minimising
    ``sum_bins m (x - clip(x, a, b))^2 + (mass inside) s^2 / 12`` with ``s = (b - a) / steps``,
    ``x`` the bin centres."""
    total = hist.sum()
    if total <= 0:
        return lo, hi
    x = _centers(lo, hi, len(hist))
    m = hist / total
    fr = np.linspace(1.0 / grid, 1.0, grid)
    a_cand = np.unique(np.minimum(lo, 0.0) * fr) if lo < 0 else np.array([lo])
    b_cand = np.unique(np.maximum(hi, 0.0) * fr) if hi > 0 else np.array([hi])
    b = b_cand[:, None]
    best = (math.inf, 0, 0)
    for i, a in enumerate(a_cand):  # one row of the grid at a time: memory O(grid * bins)
        s = (np.maximum(b, 0.0) - min(a, 0.0)) / steps
        clipped = np.clip(x[None, :], a, b)
        inside = (x[None, :] >= a) & (x[None, :] <= b)
        err = ((x[None, :] - clipped) ** 2 * m).sum(-1) + (inside * m).sum(-1) * s[:, 0] ** 2 / 12
        j = int(np.argmin(err))
        if err[j] < best[0]:
            best = (float(err[j]), i, j)
    _, i, j = best
    return float(a_cand[i]), float(b_cand[j])


def entropy_threshold(abs_hist: np.ndarray, amax: float, levels: int = 128) -> float:
    """TensorRT's KL calibration on the histogram of ``|x|`` over ``[0, amax]``: the threshold
    ``T = edge_i`` minimising ``KL(P_i || Q_i)``, where ``P_i`` is the first ``i`` bins with
    the tail folded into the last one and ``Q_i`` is ``P_i`` merged into ``levels`` bins and
    spread back uniformly over the non-empty bins of each group."""
    n = len(abs_hist)
    total = abs_hist.sum()
    if total <= 0 or amax <= 0 or n <= levels:
        return amax
    width = amax / n
    stride = max(1, (n - levels) // 256)
    best_kl, best_i = math.inf, n
    tail = np.concatenate([np.cumsum(abs_hist[::-1])[::-1], [0.0]])  # tail[i] = sum(h[i:])
    for i in range(levels, n + 1, stride):
        sliced = abs_hist[:i].astype(np.float64)
        p = sliced.copy()
        p[-1] += tail[i]
        nz = p > 0
        # Q: the clipped histogram (tail not folded in) merged into `levels` groups and spread
        # uniformly over the non-empty bins of each group; the bin -> group map is monotone
        group = (np.arange(i) * levels) // i
        gsum = np.bincount(group, weights=sliced, minlength=levels)
        gcnt = np.bincount(group, weights=nz.astype(np.float64), minlength=levels)
        q = np.where(nz, gsum[group] / np.maximum(gcnt[group], 1.0), 0.0)
        q = np.where(nz & (q <= 0), 1e-12 * total, q)  # smoothing: KL stays finite
        pn, qn = p[nz] / p.sum(), q[nz] / q.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return min(amax, best_i * width)
