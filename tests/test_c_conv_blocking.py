"""The packed float convolution (``backends/c/conv_fast.py``) compiled, against ORT.

The kernel is specialised per kernel size and dilation (literal taps), works on blocks of
``PB`` output pixels (``PB_WIDE`` where AVX-512 is on; fewer when the image has fewer pixels)
and uses ``fmaf`` where ``FP_FAST_FMAF`` says it is fast. Cases: odd sizes, asymmetric
padding, stride 1 and 2, dilation, groups, bias or none, fused Relu/Clip, images smaller than
one block and images whose pixel count leaves a short last block, output channels that leave
a short last channel block. Each model is compiled three ways: ``-O3 -march=native`` (the
vectorised, FMA, wide-block code), the same without AVX-512 (the AVX2 blocking), and ``-O2``
for the default target (the portable path). Every build must stay within ``2e-6`` of the
output range of ORT's result (plus 1e-6 absolute), and the two native builds, which differ
only in the pixel blocking, must agree bit for bit: each pixel's sum runs in the same order.
"""

from __future__ import annotations

import subprocess

import numpy as np
import onnxruntime as ort
import pytest

from graphopt.backends.c import build_many, conv_fast
from graphopt.backends.c.build import find_compiler

from .test_c_kernels import _conv_model

NATIVE = ("-O3", "-march=native")
NATIVE_NO512 = ("-O3", "-march=native", "-mno-avx512f")
PORTABLE = ("-O2",)
TOL = 2e-6  # of the output range (measured: 4e-7 at most)

# (C, H, W, M, kernel, stride, pad (t, l, b, r), dilation, group, bias, activation)
CASES = [
    (16, 9, 11, 32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True, "Relu"),
    (5, 13, 7, 24, (3, 3), (2, 2), (1, 0, 0, 1), (1, 1), 1, False, None),
    (8, 2, 2, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True, "Clip"),  # 4 px < a block
    (12, 1, 7, 20, (1, 3), (1, 1), (0, 1, 0, 1), (1, 1), 1, True, None),  # 7 px: 6 < 7 < 8
    (6, 3, 5, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, False, "Relu"),  # 15 px, m tail
    (9, 12, 10, 18, (5, 3), (2, 1), (2, 1, 1, 0), (1, 2), 1, True, None),
    (12, 8, 9, 36, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3, True, "Relu"),  # groups
    (8, 11, 11, 16, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 2, False, None),  # dilation 2
    (3, 17, 15, 64, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1, True, "Relu"),  # a stem
    (24, 3, 3, 48, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, True, "Clip"),  # 1x1, 9 px
    (20, 9, 9, 70, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, False, None),  # strided 1x1
    (64, 4, 4, 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True, None),  # resnet-like
]


def _model(i, case, rng):
    c, h, w, m, k, s, p, d, g, bias, act = case
    return _conv_model(i, (c, h, w, m, k, s, p, d, g, act), rng, bias=bias, batch=1, clip_hi=2.0)


def _has_avx512() -> bool:
    r = subprocess.run(
        [find_compiler(), "-march=native", "-dM", "-E", "-x", "c", "/dev/null"],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0 and "__AVX512F__" in r.stdout


def _source(cm) -> str:
    return (cm.path.parent / cm.name / f"{cm.name}.c").read_text()


@pytest.fixture(scope="module")
def built():
    rng = np.random.default_rng(16)
    models = {f"conv{i}": _model(i, case, rng) for i, case in enumerate(CASES)}
    xs = {
        f"conv{i}": rng.uniform(-2, 2, (1, *case[:3])).astype(np.float32)
        for i, case in enumerate(CASES)
    }
    refs = {
        k: ort.InferenceSession(m.SerializeToString()).run(None, {"x": xs[k]})[0]
        for k, m in models.items()
    }
    libs = {flags: build_many(models, flags=flags) for flags in (NATIVE, PORTABLE)}
    if _has_avx512():
        libs[NATIVE_NO512] = build_many(models, flags=NATIVE_NO512)
    return xs, refs, libs


@pytest.mark.parametrize("i", range(len(CASES)))
def test_packed_conv_matches_ort(built, i):
    xs, refs, libs = built
    name, case = f"conv{i}", CASES[i]
    ref = refs[name]
    for flags, lib in libs.items():
        cm = lib[name]
        assert not isinstance(cm, Exception), (flags, cm)
        src = _source(cm)
        kh, kw = case[4]
        ohw = ref.shape[2] * ref.shape[3]
        pointwise = "gp_pw_f32(" in src
        assert pointwise or f"gp_convp_f32_16_{kh}x{kw}" in src or "gp_convp_f32_8_" in src
        if not pointwise and ohw < conv_fast.PB_WIDE:  # a block no longer than the image
            assert f"_p{ohw}(" in src and f"_p{ohw} {min(ohw, conv_fast.PB)}\n" in src
        (got,) = cm.run(xs[name])
        err = np.abs(got - ref).max()
        assert err <= TOL * np.ptp(ref) + 1e-6, (flags, case, err / np.ptp(ref))


def test_pixel_blocking_is_bit_exact(built):
    """The AVX-512 build (blocks of PB_WIDE pixels) and the AVX2 one (PB) sum every pixel in
    the same order: equal bit for bit."""
    xs, _, libs = built
    if NATIVE_NO512 not in libs:
        pytest.skip("the native target has no AVX-512")
    for name, x in xs.items():
        (a,), (b,) = libs[NATIVE][name].run(x), libs[NATIVE_NO512][name].run(x)
        np.testing.assert_array_equal(a, b, err_msg=name)
