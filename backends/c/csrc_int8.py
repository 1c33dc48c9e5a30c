"""C source of the integer helpers: requantisation and the int8/uint8 kernels.

Placeholders ``XT`` (input), ``WT`` (weights), ``YT`` (output) and ``TAG`` are substituted per
type combination. Accumulation is int32; ``gp_requant_clamp`` scales an int32 by a real
multiplier ``M = qm * 2^-(31 + qs)`` (``qm`` in [2^30, 2^31)) with one rounding (half away from
zero) in 64-bit arithmetic, adds the output zero point and clamps: the fixed-point
requantisation of gemmlowp / TFLite / CMSIS-NN (their single-rounding variant)."""

from __future__ import annotations

from .csrc_float import pool_body

REQUANT = r"""
static int32_t gp_requant_clamp(int32_t acc, int32_t qm, int32_t qs, int zy, int qmin, int qmax)
{
  const int total = 31 + qs;
  const int64_t prod = (int64_t)acc * qm;
  int64_t v = 0;
  if (total < 63) {
    const int64_t half = (int64_t)1 << (total - 1);
    v = prod >= 0 ? (prod + half) >> total : -((-prod + half) >> total);
  }
  v += zy;
  return (int32_t)(v < qmin ? qmin : (v > qmax ? qmax : v));
}
"""

QCONV = r"""
static void gp_qconv_TAG(const XT *x, const WT *w, const int32_t *b, YT *y,
                         int C, int H, int W, int M, int OH, int OW, int KH, int KW,
                         int sh, int sw, int dh, int dw, int ph, int pw, int G,
                         int zx, const int32_t *qm, const int32_t *qs, int zy, int qmin, int qmax)
{
  const int cg = C / G, mg = M / G;
  int m, c, kh, kw, oh, ow;
  for (m = 0; m < M; ++m) {
    const int g = m / mg;
    const WT *wm = w + (long)m * cg * KH * KW;
    for (oh = 0; oh < OH; ++oh) {
      const int ih0 = oh * sh - ph;
      const int kh0 = gp_imax(0, gp_cdiv(-ih0, dh));
      const int kh1 = gp_imin(KH, gp_fdiv(H - 1 - ih0, dh) + 1);
      for (ow = 0; ow < OW; ++ow) {
        const int iw0 = ow * sw - pw;
        const int kw0 = gp_imax(0, gp_cdiv(-iw0, dw));
        const int kw1 = gp_imin(KW, gp_fdiv(W - 1 - iw0, dw) + 1);
        int32_t acc = b ? b[m] : 0;
        for (c = 0; c < cg; ++c) {
          const XT *xc = x + (long)(g * cg + c) * H * W;
          const WT *wc = wm + (long)c * KH * KW;
          for (kh = kh0; kh < kh1; ++kh)
            for (kw = kw0; kw < kw1; ++kw)
              acc += ((int32_t)xc[(long)(ih0 + kh * dh) * W + iw0 + kw * dw] - zx)
                     * (int32_t)wc[kh * KW + kw];
        }
        y[((long)m * OH + oh) * OW + ow] = (YT)gp_requant_clamp(acc, qm[m], qs[m], zy, qmin, qmax);
      }
    }
  }
}
"""

# rows of x [R][K] times packed weights [N/32][K][32]
QFC = r"""
static void gp_qfc_TAG(const XT *x, const WT *wp, const int32_t *b, YT *y, int R, int N, int K,
                       int zx, const int32_t *qm, const int32_t *qs, int zy, int qmin, int qmax)
{
  const int nb = (N + 31) / 32;
  int r, blk, k, i;
  for (r = 0; r < R; ++r)
    for (blk = 0; blk < nb; ++blk) {
      const WT *wb = wp + (long)blk * K * 32;
      const int n0 = blk * 32, nc = gp_imin(32, N - n0);
      int32_t acc[32];
      for (i = 0; i < 32; ++i) acc[i] = (b && i < nc) ? b[n0 + i] : 0;
      for (k = 0; k < K; ++k) {
        const int32_t xv = (int32_t)x[(long)r * K + k] - zx;
        const WT *wk = wb + (long)k * 32;
        GP_NOUNROLL for (i = 0; i < 32; ++i) acc[i] += xv * (int32_t)wk[i];
      }
      for (i = 0; i < nc; ++i)
        y[(long)r * N + n0 + i] =
            (YT)gp_requant_clamp(acc[i], qm[n0 + i], qs[n0 + i], zy, qmin, qmax);
    }
}
"""

# TFLite's quantized add: both inputs scaled by 2^20 and to a common scale, summed, requantised
QADD = r"""
static void gp_qadd_TAG(const XT *a, const XT *b, YT *y, long n, int za, int zb,
                        int32_t ma, int32_t sa, int32_t mb, int32_t sb, int32_t mo, int32_t so,
                        int zy, int qmin, int qmax)
{
  long i;
  for (i = 0; i < n; ++i) {
    const int32_t va = gp_requant_clamp(((int32_t)a[i] - za) * (1 << 20), ma, sa, 0,
                                        -2147483647 - 1, 2147483647);
    const int32_t vb = gp_requant_clamp(((int32_t)b[i] - zb) * (1 << 20), mb, sb, 0,
                                        -2147483647 - 1, 2147483647);
    y[i] = (YT)gp_requant_clamp(va + vb, mo, so, zy, qmin, qmax);
  }
}
"""

# average pooling: sum of (x - zx) over the window, requantised by sx / (sy * count) taken
# from a table indexed by the window's count
_QAVG_SIGNATURE = r"""
static void gp_qavg_TAG(const XT *x, YT *y, long NC, const int *in, const int *out, const int *k,
                        const int *s, const int *d, const int *pb, const int *pe, int include_pad,
                        int zx, const int32_t *qm, const int32_t *qs, int zy, int qmin, int qmax)"""
QAVG = _QAVG_SIGNATURE + pool_body(
    "XT",
    "YT",
    "int32_t acc = 0;",
    """            acc += (int32_t)xc[((long)i0 * in[1] + i1) * in[2] + i2] - zx;
            ++cnt;""",
    """      cnt = include_pad ? padded : cnt;
      yc[((long)o0 * out[1] + o1) * out[2] + o2] =
          (YT)gp_requant_clamp(acc, qm[cnt], qs[cnt], zy, qmin, qmax);""",
)


def specialise(code: str, tag: str, xt: str, yt: str, wt: str = "int8_t") -> str:
    return code.replace("TAG", tag).replace("XT", xt).replace("YT", yt).replace("WT", wt)


# depthwise (G == C == M): each output row in chunks of 64 int32 accumulators; per tap an
# axpy over the valid part of the chunk (contiguous for stride 1)
QDW = r"""
static void gp_qdw_TAG(const XT *x, const WT *w, const int32_t *b, YT *y, int C, int H, int W,
                       int OH, int OW, int KH, int KW, int sh, int sw, int dh, int dw, int ph,
                       int pw, int zx, const int32_t *qm, const int32_t *qs, int zy, int qmin,
                       int qmax)
{
  int c, oh, o0, kh, kw, j;
  for (c = 0; c < C; ++c) {
    const XT *xc = x + (long)c * H * W;
    const WT *wc = w + (long)c * KH * KW;
    for (oh = 0; oh < OH; ++oh)
      for (o0 = 0; o0 < OW; o0 += 64) {
        const int n = gp_imin(64, OW - o0);
        int32_t acc[64];
        for (j = 0; j < n; ++j) acc[j] = b ? b[c] : 0;
        for (kh = 0; kh < KH; ++kh) {
          const int ih = oh * sh - ph + kh * dh;
          const XT *xr = xc + (long)(ih < 0 ? 0 : ih) * W;
          if (ih < 0 || ih >= H) continue;
          for (kw = 0; kw < KW; ++kw) {
            const int32_t wv = (int32_t)wc[kh * KW + kw];
            const int j0 = gp_imax(0, gp_cdiv(pw - kw * dw, sw) - o0);
            const int j1 = gp_imin(n, gp_fdiv(W - 1 + pw - kw * dw, sw) + 1 - o0);
            const long base = (long)o0 * sw - pw + kw * dw;
            if (sw == 1) {
              for (j = j0; j < j1; ++j) acc[j] += ((int32_t)xr[base + j] - zx) * wv;
            } else {
              for (j = j0; j < j1; ++j) acc[j] += ((int32_t)xr[base + (long)j * sw] - zx) * wv;
            }
          }
        }
        for (j = 0; j < n; ++j)
          y[((long)c * OH + oh) * OW + o0 + j] =
              (YT)gp_requant_clamp(acc[j], qm[c], qs[c], zy, qmin, qmax);
      }
  }
}
"""

# 1x1, stride 1, no padding: Y[M][P] = W[M][C] X[C][P] vectorised over pixels, weights packed
# [M/4][C][4]
QPW = r"""
static void gp_qpw_TAG(const XT *x, const WT *wp, const int32_t *b, YT *y, int C, int M, long P,
                       int zx, const int32_t *qm, const int32_t *qs, int zy, int qmin, int qmax)
{
  const int nmb = (M + 3) / 4;
  int mb, r, c;
  long p0, j;
  for (mb = 0; mb < nmb; ++mb) {
    const WT *wb = wp + (long)mb * C * 4;
    const int m0 = mb * 4, mc = gp_imin(4, M - m0);
    for (p0 = 0; p0 < P; p0 += 32) {
      const long np = P - p0 < 32 ? P - p0 : 32;
      int32_t acc[4][32], xv[32];
      for (r = 0; r < 4; ++r) {
        const int32_t bv = (b && r < mc) ? b[m0 + r] : 0;
        for (j = 0; j < 32; ++j) acc[r][j] = bv;
      }
      for (c = 0; c < C; ++c) {
        const XT *xr = x + (long)c * P + p0;
        const WT *wr = wb + (long)c * 4;
        for (j = 0; j < 32; ++j) xv[j] = j < np ? (int32_t)xr[j] - zx : 0;
        for (r = 0; r < 4; ++r) {
          const int32_t wv = (int32_t)wr[r];
          GP_NOUNROLL for (j = 0; j < 32; ++j) acc[r][j] += wv * xv[j];
        }
      }
      for (r = 0; r < mc; ++r)
        for (j = 0; j < np; ++j)
          y[(long)(m0 + r) * P + p0 + j] =
              (YT)gp_requant_clamp(acc[r][j], qm[m0 + r], qs[m0 + r], zy, qmin, qmax);
    }
  }
}
"""
