"""Direct convolution with weights repacked at compile time, for constant weights.

Weights ``[M][C/G][KH][KW]`` are stored as ``[G][M/G/MB][C/G][KH][KW][MB]`` (output channels in
blocks of ``MB``, zero-padded), so one input value times ``MB`` consecutive weights updates
``MB`` output channels: the inner loop is a contiguous, vectorisable axpy and the ``PB x MB``
accumulators stay in registers. Output pixels (row-major, rows may be crossed) go in blocks of
``PB``; a block whose every tap lies inside the input runs the unchecked loop, other pixels
(borders) run a checked one-pixel loop. Plain C99; GCC is kept from fully unrolling the ``MB``
loop (which would stop it vectorising that loop) with ``#pragma GCC unroll 1``.
"""

from __future__ import annotations

import re

import numpy as np

from . import csrc_float
from .ctext import act_args
from .opbase import ConvGeometry

PB = 8

NOUNROLL = r"""
#if defined(__GNUC__) && !defined(__clang__)
#define GP_NOUNROLL _Pragma("GCC unroll 1")
#else
#define GP_NOUNROLL
#endif
"""

KERNEL = r"""
/* @PB@ output pixels (flat indices pix[], every tap inside the input) x @MB@ output channels */
static void gp_convp_blk_@SFX@(const @XT@ *xg, const @WT@ *wb, const @AT@ *bias, @YT@ *y,
                               const long *pix, const long *base, int cg, long hw, int W,
                               int KH, int KW, int dh, int dw, long ohw, int m0, int mc,
                               @QP@)
{
  @AT@ acc[@PB@][@MB@];
  int i, p, c, kh, kw;
  const int taps = KH * KW;
  for (p = 0; p < @PB@; ++p)
    for (i = 0; i < @MB@; ++i) acc[p][i] = bias[i];
  for (c = 0; c < cg; ++c) {
    const @XT@ *xc = xg + (long)c * hw;
    const @WT@ *wc = wb + (long)c * taps * @MB@;
    for (kh = 0; kh < KH; ++kh)
      for (kw = 0; kw < KW; ++kw) {
        const long off = (long)kh * dh * W + (long)kw * dw;
        const @WT@ *wt = wc + (kh * KW + kw) * @MB@;
        for (p = 0; p < @PB@; ++p) {
          const @AT@ xv = @XV(xc[base[p] + off])@;
          GP_NOUNROLL for (i = 0; i < @MB@; ++i) acc[p][i] += xv * (@AT@)wt[i];
        }
      }
  }
  for (i = 0; i < mc; ++i) {
    @YT@ *yr = y + (long)(m0 + i) * ohw;
    for (p = 0; p < @PB@; ++p) yr[pix[p]] = @STORE(acc[p][i], m0 + i)@;
  }
}

/* up to @PB@ pixels whose taps may fall outside the input (borders, leftovers) */
static void gp_convp_msk_@SFX@(const @XT@ *xg, const @WT@ *wb, const @AT@ *bias, @YT@ *y,
                               const long *pix, int np, int cg, long hw, int H, int W, int OW,
                               int KH, int KW, int sh, int sw, int dh, int dw, int ph, int pw,
                               long ohw, int m0, int mc, @QP@)
{
  @AT@ acc[@PB@][@MB@];
  int ih0[@PB@], iw0[@PB@];
  int i, p, c, kh, kw;
  const int taps = KH * KW;
  for (p = 0; p < @PB@; ++p) {
    if (p < np) {
      ih0[p] = (int)(pix[p] / OW) * sh - ph;
      iw0[p] = (int)(pix[p] % OW) * sw - pw;
    } else {
      ih0[p] = -H - KH * dh;  /* no tap of a missing pixel is inside */
      iw0[p] = 0;
    }
    for (i = 0; i < @MB@; ++i) acc[p][i] = bias[i];
  }
  for (c = 0; c < cg; ++c) {
    const @XT@ *xc = xg + (long)c * hw;
    const @WT@ *wc = wb + (long)c * taps * @MB@;
    for (kh = 0; kh < KH; ++kh)
      for (kw = 0; kw < KW; ++kw) {
        const @WT@ *wt = wc + (kh * KW + kw) * @MB@;
        for (p = 0; p < @PB@; ++p) {
          const int ih = ih0[p] + kh * dh, iw = iw0[p] + kw * dw;
          const @AT@ xv = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? @XV(xc[(long)ih * W + iw])@ : 0;
          GP_NOUNROLL for (i = 0; i < @MB@; ++i) acc[p][i] += xv * (@AT@)wt[i];
        }
      }
  }
  for (i = 0; i < mc; ++i) {
    @YT@ *yr = y + (long)(m0 + i) * ohw;
    for (p = 0; p < np; ++p) yr[pix[p]] = @STORE(acc[p][i], m0 + i)@;
  }
}

static void gp_convp_@SFX@(const @XT@ *x, const @WT@ *wp, const @AT@ *b, @YT@ *y,
                               int C, int H, int W, int M, int OH, int OW, int KH, int KW,
                               int sh, int sw, int dh, int dw, int ph, int pw, int G,
                               @QP@)
{
  const int cg = C / G, mg = M / G, nb = (mg + @MB@ - 1) / @MB@, taps = KH * KW;
  const long ohw = (long)OH * OW, hw = (long)H * W;
  int g, blk, i;
  for (g = 0; g < G; ++g)
  for (blk = 0; blk < nb; ++blk) {
    const @WT@ *wb = wp + ((long)g * nb + blk) * cg * taps * @MB@;
    const int m0 = g * mg + blk * @MB@;
    const int mc = gp_imin(@MB@, mg - blk * @MB@);
    const @XT@ *xg = x + (long)g * cg * hw;
    @AT@ bias[@MB@];
    long ipix[@PB@], ibase[@PB@], bpix[@PB@], p;
    int ni = 0, nbd = 0;
    for (i = 0; i < @MB@; ++i) bias[i] = (b && i < mc) ? b[m0 + i] : 0;
    for (p = 0; p < ohw; ++p) {
      const int ih = (int)(p / OW) * sh - ph, iw = (int)(p % OW) * sw - pw;
      if (ih >= 0 && iw >= 0 && ih + (KH - 1) * dh < H && iw + (KW - 1) * dw < W) {
        ipix[ni] = p;
        ibase[ni++] = (long)ih * W + iw;
        if (ni == @PB@) {
          gp_convp_blk_@SFX@(xg, wb, bias, y, ipix, ibase, cg, hw, W, KH, KW, dh, dw, ohw,
                             m0, mc, @QA@);
          ni = 0;
        }
      } else {
        bpix[nbd++] = p;
        if (nbd == @PB@) {
          gp_convp_msk_@SFX@(xg, wb, bias, y, bpix, nbd, cg, hw, H, W, OW, KH, KW, sh, sw,
                             dh, dw, ph, pw, ohw, m0, mc, @QA@);
          nbd = 0;
        }
      }
    }
    if (ni)
      gp_convp_msk_@SFX@(xg, wb, bias, y, ipix, ni, cg, hw, H, W, OW, KH, KW, sh, sw, dh, dw,
                         ph, pw, ohw, m0, mc, @QA@);
    if (nbd)
      gp_convp_msk_@SFX@(xg, wb, bias, y, bpix, nbd, cg, hw, H, W, OW, KH, KW, sh, sw, dh, dw,
                         ph, pw, ohw, m0, mc, @QA@);
  }
}
"""


# 1x1 convolution with stride 1 and no padding: Y[M][P] = W[M][C] X[C][P], vectorised over
# pixels (x rows and y rows contiguous); weights packed [M/MR][C][MR].
MR, NR = 4, 32
POINTWISE = r"""
static void gp_pw_store_f32(float *y, const float *acc, long n, int act, float lo, float hi)
{
  long j;
  if (act == 1) {
    for (j = 0; j < n; ++j) y[j] = acc[j] > 0.f ? acc[j] : 0.f;
  } else if (act == 2) {
    for (j = 0; j < n; ++j) { const float v = acc[j] < lo ? lo : acc[j]; y[j] = v > hi ? hi : v; }
  } else {
    for (j = 0; j < n; ++j) y[j] = acc[j];
  }
}

static void gp_pw_f32(const float *x, const float *wp, const float *b, float *y, int C, int M,
                      long P, int act, float lo, float hi)
{
  const int nmb = (M + @MR@ - 1) / @MR@;
  int mb, r, c;
  long p0, j;
  for (mb = 0; mb < nmb; ++mb) {
    const float *wb = wp + (long)mb * C * @MR@;
    const int m0 = mb * @MR@, mc = gp_imin(@MR@, M - m0);
    for (p0 = 0; p0 < P; p0 += @NR@) {
      const long np = P - p0 < @NR@ ? P - p0 : @NR@;
      float acc[@MR@][@NR@];
      for (r = 0; r < @MR@; ++r) {
        const float bv = (b && r < mc) ? b[m0 + r] : 0.f;
        for (j = 0; j < @NR@; ++j) acc[r][j] = bv;
      }
      if (np == @NR@) {
        for (c = 0; c < C; ++c) {
          const float *xr = x + (long)c * P + p0;
          const float *wr = wb + (long)c * @MR@;
          for (r = 0; r < @MR@; ++r) {
            const float wv = wr[r];
            GP_NOUNROLL for (j = 0; j < @NR@; ++j) acc[r][j] += wv * xr[j];
          }
        }
      } else {
        for (c = 0; c < C; ++c) {
          const float *xr = x + (long)c * P + p0;
          const float *wr = wb + (long)c * @MR@;
          for (r = 0; r < @MR@; ++r)
            for (j = 0; j < np; ++j) acc[r][j] += wr[r] * xr[j];
        }
      }
      for (r = 0; r < mc; ++r) gp_pw_store_f32(y + (long)(m0 + r) * P + p0, acc[r], np, act, lo, hi);
    }
  }
}
""".replace("@MR@", str(MR)).replace("@NR@", str(NR))


def pointwise(geo: ConvGeometry) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped conv over at least two pixel tiles."""
    return (
        geo.KH == geo.KW == 1
        and geo.sh == geo.sw == 1
        and geo.ph == geo.pw == 0
        and geo.G == 1
        and geo.H == geo.OH
        and geo.W == geo.OW
        and geo.H * geo.W >= 2 * NR
    )


ACTF = r"""
static float gp_actf(float v, int act, float lo, float hi)
{
  if (act == 1) return v > 0.f ? v : 0.f;
  if (act == 2) { v = v < lo ? lo : v; return v > hi ? hi : v; }
  return v;
}
"""


def convp_source(mb: int, q: dict | None = None) -> tuple[str, str]:
    """(function name, C source) of the packed convolution for blocks of ``mb`` channels.

    ``q`` None: float. Otherwise integer: ``q["xt"]``/``q["yt"]`` the input/output C types,
    ``q["wt"]`` the weight type; int32 accumulation and requantisation (``gp_requant``)."""
    if q is None:
        sub = {
            "@SFX@": f"f32_{mb}",
            "@XT@": "float",
            "@WT@": "float",
            "@AT@": "float",
            "@YT@": "float",
            "@QP@": "int act, float lo, float hi",
            "@QA@": "act, lo, hi",
        }

        def xv(e):
            return e

        def store(v, ch):
            return f"gp_actf({v}, act, lo, hi)"
    else:
        tag = "".join(
            {"int8_t": "s8", "uint8_t": "u8", "int16_t": "s16"}[q[k]] for k in ("xt", "wt", "yt")
        )
        sub = {
            "@SFX@": f"{tag}_{mb}",
            "@XT@": q["xt"],
            "@WT@": q["wt"],
            "@AT@": "int32_t",
            "@YT@": q["yt"],
            "@QP@": "int zx, const int32_t *qm, const int32_t *qs, int zy, int qmin, int qmax",
            "@QA@": "zx, qm, qs, zy, qmin, qmax",
        }

        def xv(e):
            return f"((int32_t)({e}) - zx)"

        def store(v, ch):
            return f"({q['yt']})gp_requant_clamp({v}, qm[{ch}], qs[{ch}], zy, qmin, qmax)"

    src = KERNEL.replace("@MB@", str(mb)).replace("@PB@", str(PB))
    for k, v in sub.items():
        src = src.replace(k, v)
    src = re.sub(r"@XV\((.*?)\)@", lambda m: xv(m.group(1)), src)
    src = re.sub(r"@STORE\((.*?), (.*?)\)@", lambda m: store(m.group(1), m.group(2)), src)
    assert "@" not in src, src[src.index("@") - 50 : src.index("@") + 50]
    return f"gp_convp_{sub['@SFX@']}", src


def block_size(mg: int) -> int:
    """The largest block of 32, 16, 8 output channels wasting at most 1/8 on zero padding."""
    for mb in (32, 16):
        if -(-mg // mb) * mb - mg <= mg // 8:
            return mb
    return 8


def applicable(geo: ConvGeometry) -> bool:
    """Worth it when each group has several output channels (not depthwise)."""
    return geo.M // geo.G >= 4


def pack(w: np.ndarray, groups: int, mb: int, dtype=np.float32) -> np.ndarray:
    """``[M][cg][KH][KW]`` -> ``[G][nb][cg][KH][KW][MB]`` with zero rows past ``M/G``."""
    m, cg = w.shape[0], w.shape[1]
    taps = int(np.prod(w.shape[2:], dtype=np.int64))
    mg = m // groups
    nb = -(-mg // mb)
    wg = w.reshape(groups, mg, cg, taps).astype(dtype)
    out = np.zeros((groups, nb * mb, cg, taps), dtype)
    out[:, :mg] = wg
    return np.ascontiguousarray(out.reshape(groups, nb, mb, cg, taps).transpose(0, 1, 3, 4, 2))


def emit(cg, geo: ConvGeometry, w: np.ndarray, b, x: str, y: str, act) -> str:
    """C statements for a float conv with constant weights ``w``: the pointwise kernel or the
    packed direct convolution, once per image of the batch."""
    cg.helper("div", csrc_float.DIV)
    cg.helper("nounroll", NOUNROLL)
    bias = cg.ptr(b.name) if b is not None else "0"
    if pointwise(geo):
        cg.helper("pw", POINTWISE)
        wsym = cg.weight(pack(w, 1, MR).reshape(-1), f"conv1x1_w_packed_{MR}")
        fn, args = "gp_pw_f32", f"{geo.C}, {geo.M}, {geo.H * geo.W}"
    else:
        mb = block_size(geo.M // geo.G)
        cg.helper("actf", ACTF)
        fn, src = convp_source(mb)
        cg.helper(fn, src)
        wsym = cg.weight(pack(w, geo.G, mb).reshape(-1), f"conv_w_packed_{mb}")
        args = geo.args()
    return (
        f"  const float *x = {x};\n  float *y = {y};\n  int n;\n"
        f"  for (n = 0; n < {geo.N}; ++n)\n"
        f"    {fn}(x + (long)n * {geo.x_size}, {wsym}, {bias}, y + (long)n * {geo.y_size}, "
        f"{args}, {act_args(act)});"
    )
