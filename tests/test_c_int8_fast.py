"""The channel-vectorised int8 kernels against the generic ones (issue 16, part 2).

- ``gp_q8convu``: the GEMM conv on u8 x s8 products (``u = x - zx + uz``, the bias carrying
  ``- uz * sum w``), tiles of 16 pixels and more requantised a channel row at a time, smaller
  ones (small planes, the last tile) a pixel at a time across the channels;
- ``gp_dw_cl``: the depthwise conv of small planes with channels innermost;
- the per-channel depthwise and the pointwise kernels requantising each block of outputs
  where it is computed (every shift on the double path), else through the int32 rows.

Each case is a one-op QDQ model compiled with the specialised kernels and with the generic
ones (``opbase.FAST`` without the kernel's key): equal bit for bit, and within one output
step of ORT running the QDQ ops as float. Shapes: odd channel counts (a partial block of 16
channels, a partial block of 4 output channels), strides 1 and 2, asymmetric padding,
dilation, groups, planes of 1 to 64 pixels; int8 and uint8 activations; multipliers on both
sides of the double path's limit (shift 42). The specialised builds at ``-O3
-march=native`` (vectorised: vpdpbusd where VNNI is on) equal those at ``-O2`` without
``-march`` bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.backends.c import build_many, conv_dw, conv_q8
from graphopt.backends.c.csrc_int8 import lane_tables

from .test_c_depthwise import _both, _conv, _near_ort, _source

PLAIN = ("-O2",)

# (C, M, H, W, K, stride, pads [t, l, b, r], group, dilation)
GEMM = [
    (40, 11, 2, 2, 1, 1, [0, 0, 0, 0], 1, 1),  # 4 pixels: lanes, 3 output channels past 8
    (33, 20, 3, 3, 1, 1, [0, 0, 0, 0], 1, 1),  # 9 pixels, odd channels
    (64, 24, 4, 4, 1, 1, [0, 0, 0, 0], 1, 1),  # 16 pixels: channel rows
    (70, 13, 5, 5, 1, 1, [0, 0, 0, 0], 1, 1),  # 25 pixels: a 4x4 block tail of 1
    (12, 9, 7, 6, 3, 1, [1, 0, 2, 1], 1, 1),  # 3x3, asymmetric padding
    (16, 10, 9, 9, 3, 2, [1, 1, 1, 1], 1, 1),  # stride 2
    (8, 6, 9, 9, 3, 1, [2, 2, 2, 2], 1, 2),  # dilation 2
    (8, 6, 6, 6, 3, 1, [1, 1, 1, 1], 2, 1),  # two groups
    (64, 8, 8, 8, 3, 1, [1, 1, 1, 1], 1, 1),  # K 576: tiles of 56 pixels, then 8 (lanes)
    (20, 12, 9, 7, 1, 2, [0, 0, 0, 0], 1, 1),  # 1x1 stride 2: rows copied
]

DEPTHWISE = [
    (37, 37, 4, 4, 3, 1, [1, 1, 1, 1], 37, 1),  # 16 pixels, a partial block of 5 channels
    (21, 21, 8, 8, 3, 2, [1, 1, 1, 1], 21, 1),  # stride 2 to 4x4
    (16, 16, 2, 2, 3, 1, [1, 1, 1, 1], 16, 1),  # 2x2
    (5, 5, 1, 1, 3, 1, [1, 1, 1, 1], 5, 1),  # one pixel
    (18, 18, 5, 6, 3, 1, [1, 0, 0, 1], 18, 1),  # 30 pixels, asymmetric padding
    (9, 9, 7, 7, 5, 2, [2, 2, 2, 2], 9, 1),  # 5x5 stride 2
    (7, 7, 6, 6, 3, 1, [2, 2, 2, 2], 7, 2),  # dilation 2
    (6, 6, 3, 5, 3, 2, [0, 1, 0, 1], 6, 1),  # odd plane, stride 2
    (10, 10, 20, 20, 3, 1, [1, 1, 1, 1], 10, 1),  # per-channel kernel, chunks of 16
    (10, 10, 9, 9, 3, 2, [1, 1, 1, 1], 10, 1),  # per-channel kernel, rows of 5
]

POINTWISE = [
    (16, 24, 8, 8, 1, 1, [0, 0, 0, 0], 1, 1),
    (23, 7, 6, 9, 1, 1, [0, 0, 0, 0], 1, 1),  # 54 pixels: a partial block of 16
    (100, 13, 4, 9, 1, 1, [0, 0, 0, 0], 1, 1),
]


def _builds(models: dict, fast: str) -> dict:
    """{name: (specialised -O3 -march=native, specialised -O2, generic -O3 -march=native)}."""
    both = _both(models, fast)  # test_c_depthwise's -O3 -march=native pair
    plain = build_many(models, flags=PLAIN)
    for name in models:
        for cm in (*both[name], plain[name]):
            assert not isinstance(cm, Exception), (name, cm)
    return {k: (both[k][0], plain[k], both[k][1]) for k in models}


def _check(models, built, cases, rng, sy):
    for i, case in enumerate(cases):
        native, plain, gen = built[f"m{i}"]
        x = rng.uniform(-4, 4, (1, case[0], *case[2:4])).astype(np.float32)
        (a,), (b,), (c,) = native.run(x), plain.run(x), gen.run(x)
        np.testing.assert_array_equal(a, c, err_msg=f"native vs generic {case}")
        np.testing.assert_array_equal(b, c, err_msg=f"-O2 vs generic {case}")
        _near_ort(models[f"m{i}"], x, a, case, step=sy)


@pytest.mark.parametrize("sy", [0.25, 40.0])
@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_u8_gemm_conv_matches_the_generic_kernel(kind, sy):
    rng = np.random.default_rng(11)
    models = {f"m{i}": _conv(case, rng, kind, sy) for i, case in enumerate(GEMM)}
    built = _builds(models, "int8-gemm")
    for i, case in enumerate(GEMM):
        src = _source(built[f"m{i}"][0])
        assert "gp_q8convu_" in src and "gp_qconv_" not in src, case
        assert ("requant_dm" in src) == (sy < 1), case  # 40: shifts past 42, rows only
    _check(models, built, GEMM, rng, sy)


@pytest.mark.parametrize("sy", [0.25, 40.0])
@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_depthwise_kernels_match_the_generic_kernel(kind, sy):
    rng = np.random.default_rng(12)
    models = {f"m{i}": _conv(case, rng, kind, sy) for i, case in enumerate(DEPTHWISE)}
    built = _builds(models, "depthwise")
    for i, case in enumerate(DEPTHWISE):
        src = _source(built[f"m{i}"][0])
        oh = (case[2] + case[6][0] + case[6][2] - case[8] * (case[4] - 1) - 1) // case[5] + 1
        ow = (case[3] + case[6][1] + case[6][3] - case[8] * (case[4] - 1) - 1) // case[5] + 1
        cl = oh * ow <= conv_dw.PCL and sy < 1
        assert ("gp_dw_cl_" in src) == cl and "gp_dw_" in src, case
    _check(models, built, DEPTHWISE, rng, sy)


@pytest.mark.parametrize("sy", [0.25, 40.0])
@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_pointwise_requantising_in_place_matches_the_generic_kernel(kind, sy):
    rng = np.random.default_rng(13)
    models = {f"m{i}": _conv(case, rng, kind, sy) for i, case in enumerate(POINTWISE)}
    built = _builds(models, "int8-gemm")
    for i, case in enumerate(POINTWISE):
        src = _source(built[f"m{i}"][0])
        assert "gp_q8pw_" in src and ("requant_dm" in src) == (sy < 1), case
    _check(models, built, POINTWISE, rng, sy)


def test_u8_bias_and_lane_tables():
    rng = np.random.default_rng(16)
    w = rng.integers(-128, 128, (5, 3, 3, 3)).astype(np.int8)
    b = rng.integers(-1000, 1000, 5).astype(np.int32)
    x = rng.integers(-128, 128, (3, 3, 3)).astype(np.int64)
    zx = -7
    uz = conv_q8.u_zero("int8_t", zx)
    got = conv_q8.bias_u8(w, b, uz).astype(np.int64) + (w.astype(np.int64) * (x + 128)).reshape(
        5, -1
    ).sum(1)
    want = b + (w.astype(np.int64) * (x - zx)).reshape(5, -1).sum(1)
    np.testing.assert_array_equal(got, want)
    dm, cap = lane_tables(np.array([2**30, 2**31 - 1, 0]), np.array([11, -20, 0]))
    assert dm[0] == 2.0**30 * 2.0**-42 and dm[2] == 0 and cap.dtype == np.int32
    assert lane_tables(np.array([2**30]), np.array([12])) is None
