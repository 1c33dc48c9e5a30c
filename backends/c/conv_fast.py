"""Float direct convolution with weights repacked at compile time, for constant weights.

Weights ``[M][C/G][KH][KW]`` are stored as ``[G][M/G/MB][C/G][KH][KW][MB]`` (output channels in
blocks of ``MB``, zero-padded), so one input value times ``MB`` consecutive weights updates
``MB`` output channels: the inner loop is a contiguous, vectorisable axpy and the ``PB x MB``
accumulators stay in registers. Output pixels (row-major, rows may be crossed) go in blocks of
``PB`` (a short last block repeats its last pixel). A conv that pads first copies its input,
zero-padded, into scratch, so that no tap needs a border test. Plain C99; GCC is kept from
fully unrolling the ``MB`` loop (which would stop it vectorising that loop) with
``#pragma GCC unroll 1``.
"""

from __future__ import annotations

import numpy as np

from . import csrc_float
from .ctext import act_args
from .opbase import ConvGeometry

PB = 6  # output pixels per block: PB x MB = 6 x 16 accumulators fill 12 AVX2 registers

# GP_NOUNROLL: keep GCC from fully unrolling a loop before it vectorises it. GP_NOINLINE:
# keep a kernel out of the (long) run function, where GCC 12 compiles the same loops up to 6x
# slower (measured on the depthwise kernels of mobilenet_v2).
NOUNROLL = r"""
#if defined(__GNUC__) && !defined(__clang__)
#define GP_NOUNROLL _Pragma("GCC unroll 1")
#else
#define GP_NOUNROLL
#endif
#if defined(__GNUC__)
#define GP_NOINLINE __attribute__((noinline))
#else
#define GP_NOINLINE
#endif
"""

KERNEL = r"""
/* @PB@ output pixels (offsets base[] into the input planes xs, row length WS) x @MB@ output
   channels: every tap of every pixel lies inside xs (padded when the conv pads) */
static void gp_convp_blk_f32_@MB@(const float *xs, const float *wb, const float *bias,
                                 float *y, const long *base, int np, int cg, long hws,
                                 int WS, int KH, int KW, int dh, int dw, long ohw, int mc,
                                 int act, float lo, float hi)
{
  float acc[@PB@][@MB@];
  int i, p, c, kh, kw;
  for (p = 0; p < @PB@; ++p)
    for (i = 0; i < @MB@; ++i) acc[p][i] = bias[i];
  for (c = 0; c < cg; ++c) {
    const float *xc = xs + (long)c * hws;
    const float *wc = wb + (long)c * KH * KW * @MB@;
    for (kh = 0; kh < KH; ++kh)
      for (kw = 0; kw < KW; ++kw) {
        const long off = (long)kh * dh * WS + (long)kw * dw;
        const float *wt = wc + (kh * KW + kw) * @MB@;
        for (p = 0; p < @PB@; ++p) {
          const float xv = xc[base[p] + off];
          GP_NOUNROLL for (i = 0; i < @MB@; ++i) acc[p][i] += xv * wt[i];
        }
      }
  }
  for (p = 0; p < np; ++p) gp_act_block_f32_@MB@(acc[p], act, lo, hi);
  for (i = 0; i < mc; ++i)
    for (p = 0; p < np; ++p) y[(long)i * ohw + p] = acc[p][i];
}

/* weights packed [G][M/G/@MB@][C/G][KH][KW][@MB@]; xp: scratch for the padded input (C planes
   of HP x WP) when the conv pads, else unused */
GP_NOINLINE static void gp_convp_f32_@MB@(const float *x, const float *wp, const float *b, float *y,
                             float *xp, int C, int H, int W, int M, int OH, int OW, int KH,
                             int KW, int sh, int sw, int dh, int dw, int ph, int pw, int G,
                             int act, float lo, float hi)
{
  const int cg = C / G, mg = M / G, nb = (mg + @MB@ - 1) / @MB@, taps = KH * KW;
  const int HP = (OH - 1) * sh + (KH - 1) * dh + 1, WP = (OW - 1) * sw + (KW - 1) * dw + 1;
  const int inside = ph == 0 && pw == 0 && HP <= H && WP <= W;
  const int WS = inside ? W : WP;
  const long ohw = (long)OH * OW, hws = inside ? (long)H * W : (long)HP * WP;
  const float *xs = x;
  int g, blk, i, p;
  long p0;
  if (!inside) {  /* xp[c][r][col] = x[c][r - ph][col - pw], 0 outside */
    const int r0 = gp_imax(0, ph), r1 = gp_imin(HP, H + ph);
    const int c0 = gp_imax(0, pw), c1 = gp_imin(WP, W + pw);
    int c, r, col;
    long k;
    for (k = 0; k < (long)C * hws; ++k) xp[k] = 0.f;
    for (c = 0; c < C; ++c)
      for (r = r0; r < r1; ++r) {
        const float *xr = x + ((long)c * H + r - ph) * W;
        float *pr = xp + (long)c * hws + (long)r * WP;
        for (col = c0; col < c1; ++col) pr[col] = xr[col - pw];
      }
    xs = xp;
  }
  for (g = 0; g < G; ++g)
    for (blk = 0; blk < nb; ++blk) {
      const float *wb = wp + ((long)g * nb + blk) * cg * taps * @MB@;
      const int m0 = g * mg + blk * @MB@;
      const int mc = gp_imin(@MB@, mg - blk * @MB@);
      float bias[@MB@];
      for (i = 0; i < @MB@; ++i) bias[i] = (b && i < mc) ? b[m0 + i] : 0.f;
      for (p0 = 0; p0 < ohw; p0 += @PB@) {
        const int np = (int)(ohw - p0 < @PB@ ? ohw - p0 : @PB@);
        long base[@PB@];
        for (p = 0; p < @PB@; ++p) {  /* a short last block repeats its last pixel */
          const long q = p0 + (p < np ? p : np - 1);
          base[p] = (q / OW) * sh * WS + (q % OW) * sw;
        }
        gp_convp_blk_f32_@MB@(xs + (long)g * cg * hws, wb, bias, y + (long)m0 * ohw + p0,
                              base, np, cg, hws, WS, KH, KW, dh, dw, ohw, mc, act, lo, hi);
      }
    }
}
"""


# 1x1 convolution with stride 1 and no padding: Y[M][P] = W[M][C] X[C][P], vectorised over
# pixels (x rows and y rows contiguous); weights packed [M/MR][C][MR].
MR, NR = 6, 16
POINTWISE = r"""
GP_NOINLINE static void gp_pw_f32(const float *x, const float *wp, const float *b, float *y, int C, int M,
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
      for (r = 0; r < mc; ++r) gp_store_act_f32(y + (long)(m0 + r) * P + p0, acc[r], np, act, lo, hi);
    }
  }
}
"""


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


def convp_source(mb: int) -> tuple[str, str]:
    """(function name, C source) of the packed float convolution for blocks of ``mb``
    output channels."""
    src = KERNEL.replace("@MB@", str(mb)).replace("@PB@", str(PB))
    assert "@" not in src
    return f"gp_convp_f32_{mb}", src


def padded(geo: ConvGeometry) -> bool:
    """Whether some tap falls outside the input (the packed kernel then copies the input,
    zero-padded, into scratch)."""
    hp = (geo.OH - 1) * geo.sh + (geo.KH - 1) * geo.dh + 1
    wp = (geo.OW - 1) * geo.sw + (geo.KW - 1) * geo.dw + 1
    return bool(geo.ph or geo.pw or hp > geo.H or wp > geo.W)


def scratch_bytes(geo: ConvGeometry) -> int:
    """The zero-padded input of the packed kernel (none for the pointwise one)."""
    if pointwise(geo) or not padded(geo):
        return 0
    hp = (geo.OH - 1) * geo.sh + (geo.KH - 1) * geo.dh + 1
    wp = (geo.OW - 1) * geo.sw + (geo.KW - 1) * geo.dw + 1
    return geo.C * hp * wp * 4


def block_size(mg: int) -> int:
    """16 output channels per block (two AVX2 registers) unless that wastes more than 1/8 on
    zero padding, else 8."""
    return 16 if -(-mg // 16) * 16 - mg <= mg // 8 else 8


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
        cg.helper("store_act", csrc_float.STORE_ACT)
        cg.helper("pw", POINTWISE.replace("@MR@", str(MR)).replace("@NR@", str(NR)))
        wsym = cg.weight(pack(w, 1, MR).reshape(-1), f"conv1x1_w_packed_{MR}")
        fn, args = "gp_pw_f32", f"{geo.C}, {geo.M}, {geo.H * geo.W}"
    else:
        mb = block_size(geo.M // geo.G)
        cg.helper(f"act_block_{mb}", csrc_float.ACT_BLOCK.replace("@N@", str(mb)))
        fn, src = convp_source(mb)
        cg.helper(fn, src)
        wsym = cg.weight(pack(w, geo.G, mb).reshape(-1), f"conv_w_packed_{mb}")
        xp = cg.scratch("float") if padded(geo) else "0"
        args = f"{xp}, {geo.args()}"
    return (
        f"  const float *x = {x};\n  float *y = {y};\n  int n;\n"
        f"  for (n = 0; n < {geo.N}; ++n)\n"
        f"    {fn}(x + (long)n * {geo.x_size}, {wsym}, {bias}, y + (long)n * {geo.y_size}, "
        f"{args}, {act_args(act)});"
    )
