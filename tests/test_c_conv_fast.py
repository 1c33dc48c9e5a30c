"""``backends/c/conv_fast.py`` without a compiler: the weight packing, the block size, when
the packed and the pointwise kernels apply, and the specialised C source."""

from __future__ import annotations

import re

import numpy as np
import pytest

from graphopt.backends.c import conv_fast
from graphopt.backends.c.opbase import ConvGeometry


def test_pack_layout_known_answer():
    # M=3 output channels, 2 inputs per group, 1x2 kernel, one group, blocks of 2 channels
    w = np.arange(12, dtype=np.float32).reshape(3, 2, 1, 2) + 1
    p = conv_fast.pack(w, groups=1, mb=2)
    assert p.shape == (1, 2, 2, 2, 2)  # [G][blocks][C/G][taps][MB]
    assert p.flags.c_contiguous and p.dtype == np.float32
    taps = w.reshape(3, 2, 2)
    for c in range(2):
        for t in range(2):
            assert list(p[0, 0, c, t]) == [taps[0, c, t], taps[1, c, t]]
            assert list(p[0, 1, c, t]) == [taps[2, c, t], 0]  # padded past M
    # flat: the MB weights one input tap meets are consecutive
    assert list(p.reshape(-1)[:4]) == [1, 5, 2, 6]


@pytest.mark.parametrize("groups, mb", [(1, 8), (2, 4), (4, 8), (3, 16)])
def test_pack_keeps_every_weight_once(groups, mb):
    rng = np.random.default_rng(groups * mb)
    m, cg = 12, 3
    w = rng.integers(-100, 100, size=(m, cg, 3, 3)).astype(np.int8)
    p = conv_fast.pack(w, groups, mb, w.dtype)
    assert p.dtype == np.int8
    mg, nb = m // groups, -(-(m // groups) // mb)
    assert p.shape == (groups, nb, cg, 9, mb)
    for o in range(m):
        g, r = divmod(o, mg)
        blk, i = divmod(r, mb)
        np.testing.assert_array_equal(p[g, blk, :, :, i], w[o].reshape(cg, 9))
    assert np.count_nonzero(p) == np.count_nonzero(w)


@pytest.mark.parametrize(
    "mg, mb",
    [(64, 16), (32, 16), (48, 16), (16, 16), (36, 8), (40, 8), (8, 8), (4, 8), (60, 16)],
)
def test_block_size_wastes_at_most_an_eighth(mg, mb):
    assert conv_fast.block_size(mg) == mb
    if mb > 8:
        assert -(-mg // mb) * mb - mg <= mg // 8


def _geo(**kw) -> ConvGeometry:
    base = dict(N=1, C=16, H=8, W=8, M=32, OH=8, OW=8, KH=1, KW=1, sh=1, sw=1, dh=1, dw=1)
    return ConvGeometry(**{**base, "ph": 0, "pw": 0, "G": 1, **kw})


def test_pointwise_needs_a_plain_1x1_conv_over_two_tiles():
    assert conv_fast.pointwise(_geo())
    assert not conv_fast.pointwise(_geo(H=5, W=5, OH=5, OW=5))  # 25 pixels < 2 * NR
    assert not conv_fast.pointwise(_geo(KH=3, KW=3))
    assert not conv_fast.pointwise(_geo(sh=2, OH=4))
    assert not conv_fast.pointwise(_geo(pw=1))
    assert not conv_fast.pointwise(_geo(G=2))


def test_packed_conv_applies_unless_groups_are_thin():
    assert conv_fast.applicable(_geo())
    assert conv_fast.applicable(_geo(G=8))  # 4 output channels per group
    assert not conv_fast.applicable(_geo(G=16))  # 2 per group
    assert not conv_fast.applicable(_geo(C=32, G=32))  # depthwise


def test_convp_source():
    geo = _geo(KH=3, KW=5, dh=1, dw=2, OH=4, OW=4)
    name, src = conv_fast.convp_source(16, geo)
    assert name == "gp_convp_f32_16_3x5d1x2"
    assert "@" not in src and f"static void {name}(" in src
    # two block functions, for PB_WIDE pixels under AVX-512 and for PB otherwise
    wide, narrow = src.split("#else")
    assert wide.lstrip().startswith("#if defined(__AVX512F__)") and "#endif" in narrow
    for part, pb in ((wide, conv_fast.PB_WIDE), (narrow, conv_fast.PB)):
        assert f"#define GP_PB_16_3x5d1x2 {pb}\n" in part
        assert f"acc[{pb}][16]" in part  # PB x MB accumulators
        # one named input pointer per pixel of a block, each an FMA row
        for p in range(pb):
            assert f"*x{p} = xs + base[{p}]" in part and f"acc[{p}][i] = GP_FMAF(" in part
        assert f"x{pb} " not in part and f"acc[{pb}]" not in part.split("float acc")[1]
    # the kernel size and dilations are literals
    assert "kh < 3" in src and "kw < 5" in src and "kw * 2]" in src
    # the block functions and the driver, each defined once (the driver kept out of line)
    assert len(re.findall(r"^(GP_NOINLINE )?GP_WIDE static void ", src, re.M)) == 3
    assert f"GP_NOINLINE GP_WIDE static void {name}(" in src
    assert src.count("long base[GP_PB_16_3x5d1x2]") == 1


def test_convp_blocks_are_no_longer_than_the_image():
    name, src = conv_fast.convp_source(8, _geo(KH=3, KW=3, OH=1, OW=7))
    assert name == "gp_convp_f32_8_3x3d1x1_p7"
    assert "#define GP_PB_8_3x3d1x1_p7 7\n" in src  # AVX-512: the 7 pixels at once
    assert f"#define GP_PB_8_3x3d1x1_p7 {conv_fast.PB}\n" in src
    assert conv_fast.convp_source(8, _geo(KH=3, KW=3, OH=2, OW=4))[0].endswith("3x3d1x1")


def test_padding_goes_to_scratch_only_when_a_tap_falls_outside():
    assert conv_fast.scratch_bytes(_geo(C=4, H=6, W=6, OH=4, OW=4, KH=3, KW=3)) == 0
    # pads 1: the 6 x 6 input goes to an 8 x 8 zero-padded copy per channel
    geo = _geo(C=4, H=6, W=6, OH=6, OW=6, KH=3, KW=3, ph=1, pw=1)
    assert conv_fast.padded(geo) and conv_fast.scratch_bytes(geo) == 4 * 8 * 8 * 4
    assert conv_fast.scratch_bytes(_geo()) == 0  # pointwise
