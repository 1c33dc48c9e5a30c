"""int8 convolution as blocked int16 dot products over (kernel row, kernel column, input
channel), for constant weights; and a pixel-vectorised kernel for 1x1 convs over few channels.

The input of each group goes once into scratch, channels last and zero-padded, as ``x - zx``
in int16 (``XS[HP][WP][cg]``; the padding is 0, which is what a tap outside the input
contributes, so no zero-point correction is needed). Output pixels are then taken in tiles of
``PT``: each pixel's taps are copied into one row ``R[p][kh][kw][c]`` (``KH`` copies of
``KW * cg`` values when the dilation is 1), zero-padded to ``KP``, a multiple of 16. A 1x1,
stride-1, unpadded conv reads its rows straight from ``XS``, which then has ``KP`` values per
pixel.

Weights are packed at code-generation time as ``[G][MG4][KP]`` (``w[m][kh][kw][c]``, zero past
``K`` and in the rows that pad each group to a multiple of 4 channels). Each block of 4 output
channels x 3 pixels is 12 dot products ``sum_k w[m][k] * R[p][k]`` over the same ``k``: int16 x
int8 (or int16) products summed in int32, the reduction ``cc -O3`` vectorises (x86:
``vpmaddwd``; with 8-bit rows GCC 12 picks ``vpmullw`` and widening adds instead, 3x slower,
hence int16 rows). ``b[m] + dot`` goes to an int32 tile (``MG4 x PT``), requantised a channel
row at a time by the vectorised ``gp_requant_row``: the integers of the generic kernel, summed
in another order, so the outputs are bit-exact with it; :func:`applicable` checks that no
partial sum can leave int32.

A pointwise conv over at most ``KPW`` channels and at least ``PMIN`` pixels runs
``gp_q8pw`` instead (vectorised over pixels, whole channel rows requantised at once), and so
does any other ungrouped conv of at most ``KCOL`` taps x channels (a first layer over 3
channels), after an im2col ``[K][P]`` in the input type whose outside taps read ``zx``.
Fully-connected layers (``QFc``) run ``gp_q8fc``: rows ``x - zx`` in int16, the same dot
products over tiles of rows, requantised by ``gp_requant_clamp``. ``gp_q8dot`` takes 4 x 3
blocks and then 4 x 1 for the last pixels, so small layers compute no duplicate pixels.

With int8 weights (no weight zero point) the GEMM conv runs ``gp_q8convu`` instead: rows of
bytes ``u = x - zx + uz`` (``uz`` = 128 for int8 inputs, 0 for uint8: u spans 0..255, and
the padding holds ``uz``), ``KP`` a multiple of 64, and ``sum_k w u`` in 4 x 4 blocks: GCC
vectorises these uint8 x int8 sums as ``vpdpbusd`` where VNNI is on (64 products per
instruction; widening multiply-adds elsewhere). The bias carries ``- uz * sum_k w[m][k]``
(:func:`bias_u8`), so ``b + sum_k w (x - zx)`` is the same integer, and no partial sum
leaves int32 (``|sum_k w u| <= 255 sum_k |w|``, checked by :func:`fits_int32`). A tile of
fewer than 16 pixels (planes of 2x2, 3x3, the last tile) is requantised a pixel at a time
across the output channels (``gp_rq1d`` with per-channel ``qm * 2^-t`` and caps, when every
shift is on the double path), not in channel rows too short to vectorise. The pointwise
kernel's portable path requantises each 16-pixel block as it is computed (same
condition), without the int32 tile.
"""

from __future__ import annotations

import numpy as np

from . import csrc_float
from .conv_fast import WIDE
from .csrc_int8 import (
    SIMD,
    f32_exact,
    lane_tables,
    output_stage,
    requant_lane,
    requant_row,
    saturation_caps,
)
from .opbase import ConvGeometry

MB, PB = 4, 3  # output channels x pixels per block of dot products
TILE_BYTES = 1 << 15  # im2col rows per tile: at most this many bytes (see _tile)

DOT = r"""
/* T[m][p] = b[m] + sum_k w[m][k] R[p][k] (T row stride PT) for np rows R (KP values each)
   and mg channels of weights w[MG4][KP]: 4 x 3 dot products at a time, then 4 x 1 for the
   last pixels (a layer of 4 pixels or an FC row would otherwise compute duplicates) */
static void gp_q8dot_@TAG@(const int16_t *R, int np, const @WT@ *w, int mg, int KP,
                          const int32_t *b, int32_t *T, int PT)
{
  int m0, p0, i, j, k;
  for (m0 = 0; m0 < mg; m0 += 4) {
    const @WT@ *w0 = w + (long)m0 * KP, *w1 = w0 + KP, *w2 = w1 + KP, *w3 = w2 + KP;
    for (p0 = 0; p0 + 3 <= np; p0 += 3) {
      const int16_t *r0 = R + (long)p0 * KP, *r1 = r0 + KP, *r2 = r1 + KP;
      int32_t a00 = 0, a01 = 0, a02 = 0, a10 = 0, a11 = 0, a12 = 0;
      int32_t a20 = 0, a21 = 0, a22 = 0, a30 = 0, a31 = 0, a32 = 0;
      int32_t acc[4][3];
      for (k = 0; k < KP; ++k) {
        const int32_t u = r0[k], v = r1[k], s = r2[k];
        const int32_t c0 = w0[k], c1 = w1[k], c2 = w2[k], c3 = w3[k];
        a00 += c0 * u; a01 += c0 * v; a02 += c0 * s;
        a10 += c1 * u; a11 += c1 * v; a12 += c1 * s;
        a20 += c2 * u; a21 += c2 * v; a22 += c2 * s;
        a30 += c3 * u; a31 += c3 * v; a32 += c3 * s;
      }
      acc[0][0] = a00; acc[0][1] = a01; acc[0][2] = a02;
      acc[1][0] = a10; acc[1][1] = a11; acc[1][2] = a12;
      acc[2][0] = a20; acc[2][1] = a21; acc[2][2] = a22;
      acc[3][0] = a30; acc[3][1] = a31; acc[3][2] = a32;
      for (i = 0; i < 4 && m0 + i < mg; ++i) {
        const int32_t bv = b ? b[m0 + i] : 0;
        for (j = 0; j < 3; ++j) T[(long)(m0 + i) * PT + p0 + j] = bv + acc[i][j];
      }
    }
    for (; p0 < np; ++p0) {
      const int16_t *r0 = R + (long)p0 * KP;
      int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, acc[4];
      for (k = 0; k < KP; ++k) {
        const int32_t u = r0[k];
        a0 += (int32_t)w0[k] * u; a1 += (int32_t)w1[k] * u;
        a2 += (int32_t)w2[k] * u; a3 += (int32_t)w3[k] * u;
      }
      acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
      for (i = 0; i < 4 && m0 + i < mg; ++i)
        T[(long)(m0 + i) * PT + p0] = (b ? b[m0 + i] : 0) + acc[i];
    }
  }
}
"""

# u8 x s8: rows of u = x - zx + uz (uz = 128 for int8 inputs, 0 for uint8: 0..255) times int8
# weights; the bias carries - uz * sum_k w[m][k] (:func:`bias_u8`). GCC vectorises the sums
# as vpdpbusd where VNNI is on (64 products per instruction), else widening multiply-adds.
DOTU = r"""
/* T[m * tm + p * tp] = b[m] + sum_k w[m][k] R[p][k] for np rows R (KP bytes each, KP a
   multiple of 64) and mg channels of weights w[MG4][KP]: 4 x 4 dot products at a time, then
   4 x 1 for the last pixels */
GP_NOINLINE static void gp_q8dotu(const uint8_t *R, int np, const int8_t *w, int mg, int KP,
                      const int32_t *b, int32_t *T, long tm, long tp)
{
  int m0, p0, i, j, k;
  for (m0 = 0; m0 < mg; m0 += 4) {
    const int8_t *w0 = w + (long)m0 * KP, *w1 = w0 + KP, *w2 = w1 + KP, *w3 = w2 + KP;
    for (p0 = 0; p0 + 4 <= np; p0 += 4) {
      const uint8_t *r0 = R + (long)p0 * KP, *r1 = r0 + KP, *r2 = r1 + KP, *r3 = r2 + KP;
      int32_t a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
      int32_t a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
      int32_t acc[4][4];
      for (k = 0; k < KP; ++k) {
        const int32_t u = r0[k], v = r1[k], s = r2[k], t = r3[k];
        const int32_t c0 = w0[k], c1 = w1[k], c2 = w2[k], c3 = w3[k];
        a00 += c0 * u; a01 += c0 * v; a02 += c0 * s; a03 += c0 * t;
        a10 += c1 * u; a11 += c1 * v; a12 += c1 * s; a13 += c1 * t;
        a20 += c2 * u; a21 += c2 * v; a22 += c2 * s; a23 += c2 * t;
        a30 += c3 * u; a31 += c3 * v; a32 += c3 * s; a33 += c3 * t;
      }
      acc[0][0] = a00; acc[0][1] = a01; acc[0][2] = a02; acc[0][3] = a03;
      acc[1][0] = a10; acc[1][1] = a11; acc[1][2] = a12; acc[1][3] = a13;
      acc[2][0] = a20; acc[2][1] = a21; acc[2][2] = a22; acc[2][3] = a23;
      acc[3][0] = a30; acc[3][1] = a31; acc[3][2] = a32; acc[3][3] = a33;
      for (i = 0; i < 4 && m0 + i < mg; ++i) {
        const int32_t bv = b[m0 + i];
        for (j = 0; j < 4; ++j) T[(m0 + i) * tm + (p0 + j) * tp] = bv + acc[i][j];
      }
    }
    for (; p0 < np; ++p0) {
      const uint8_t *r0 = R + (long)p0 * KP;
      int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, acc[4];
      for (k = 0; k < KP; ++k) {
        const int32_t u = r0[k];
        a0 += (int32_t)w0[k] * u; a1 += (int32_t)w1[k] * u;
        a2 += (int32_t)w2[k] * u; a3 += (int32_t)w3[k] * u;
      }
      acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
      for (i = 0; i < 4 && m0 + i < mg; ++i) T[(m0 + i) * tm + p0 * tp] = b[m0 + i] + acc[i];
    }
  }
}
"""

KERNELS_U = r"""
/* XS[HP][WP][KC] = u(x[c][r - ph][col - pw]) = x - zx + uz for the group's cg channels, uz
   (u of the zero point: a tap outside the input contributes 0) in the padding, 0 past cg */
static void gp_q8nhwcu_@TAG@(const @XT@ *x, uint8_t *xs, int cg, int H, int W, int HP, int WP,
                             int KC, int ph, int pw, int uz)
{
  const int r0 = gp_imax(0, ph), r1 = gp_imin(HP, H + ph);
  const int c0 = gp_imax(0, pw), c1 = gp_imin(WP, W + pw);
  int c, r, col;
  if (KC > cg) memset(xs, 0, (size_t)HP * WP * KC);
  if (r0 > 0 || c0 > 0 || r1 < HP || c1 < WP)
    for (r = 0; r < HP; ++r)
      for (col = 0; col < WP; ++col) memset(xs + ((long)r * WP + col) * KC, uz, (size_t)cg);
  for (c = 0; c < cg; ++c)
    for (r = r0; r < r1; ++r) {
      const @XT@ *xr = x + ((long)c * H + r - ph) * W;
      uint8_t *sr = xs + (long)r * WP * KC + c;
      for (col = c0; col < c1; ++col) sr[(long)col * KC] = (uint8_t)((int32_t)xr[col - pw] + @UX@);
    }
}

/* scratch: T (int32, MG4 x PT), then XS (bytes), then (unless direct) one tile of rows R.
   Tiles of at least 16 pixels are requantised a channel row at a time (gp_requant_row);
   fewer pixels (small planes), a pixel at a time across the channels (T as [PT][MG4]),
   with dm[m] = qm * 2^-t and cap[m] = min(amax, 2^31 - 1) (every t <= 42: the double path) */
GP_NOINLINE static void gp_q8convu_@TAG@(const @XT@ *x, const int8_t *wp, const int32_t *b,
                           @YT@ *y, int32_t *scratch, const uint32_t *ra, const double *dm,
                           const int32_t *cap, int C, int H, int W, int M,
                           int OH, int OW, int KH, int KW, int sh, int sw, int dh, int dw,
                           int ph, int pw, int G, int KP, int PT, int zx, const int32_t *qm,
                           const int32_t *qs, int zy, int qmin, int qmax)
{
  const int cg = C / G, mg = M / G, mg4 = (mg + 3) / 4 * 4;
  const int HP = (OH - 1) * sh + (KH - 1) * dh + 1, WP = (OW - 1) * sw + (KW - 1) * dw + 1;
  const long P = (long)OH * OW;
  const int direct = KH == 1 && KW == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  const int KC = direct ? KP : cg, uz = zx + @UX@;
  int32_t *T = scratch;
  uint8_t *xs = (uint8_t *)(void *)(scratch + (long)mg4 * PT), *R = xs + (long)HP * WP * KC;
  int g, kh, kw, m, j;
  long p0, p, k;
  for (g = 0; g < G; ++g) {
    const int8_t *wg = wp + (long)g * mg4 * KP;
    const int32_t *bg = b + g * mg;
    @YT@ *yg = y + (long)g * mg * P;
    gp_q8nhwcu_@TAG@(x + (long)g * cg * H * W, xs, cg, H, W, HP, WP, KC, ph, pw, uz);
    if (!direct)  /* the tail [KH * KW * cg, KP) of each row stays 0 */
      memset(R, 0, (size_t)PT * KP);
    for (p0 = 0; p0 < P; p0 += PT) {
      const int np = (int)(P - p0 < PT ? P - p0 : PT);
      if (!direct)
        for (p = 0; p < np; ++p) {
          const int oh = (int)((p0 + p) / OW), ow = (int)((p0 + p) % OW);
          uint8_t *row = R + p * KP;
          for (kh = 0; kh < KH; ++kh) {
            const uint8_t *src = xs + ((long)(oh * sh + kh * dh) * WP + (long)ow * sw) * cg;
            if (dw == 1) {
              uint8_t *dst = row + (long)kh * KW * cg;
              for (k = 0; k < (long)KW * cg; ++k) dst[k] = src[k];
            } else {
              for (kw = 0; kw < KW; ++kw)
                memcpy(row + ((long)kh * KW + kw) * cg, src + (long)kw * dw * cg, (size_t)cg);
            }
          }
        }
      if (np >= 16 || !dm) {
        gp_q8dotu(direct ? xs + p0 * KP : R, np, wg, mg, KP, bg, T, PT, 1);
        for (m = 0; m < mg; ++m)
          gp_requant_row_@YTAG@(T + (long)m * PT, yg + (long)m * P + p0, np, qm[g * mg + m],
                                qs[g * mg + m], ra[g * mg + m], zy, qmin, qmax);
      } else {
        const double *dg = dm + g * mg;
        const int32_t *cp = cap + g * mg;
        gp_q8dotu(direct ? xs + p0 * KP : R, np, wg, mg, KP, bg, T, 1, mg4);
        for (p = 0; p < np; ++p) {
          const int32_t *tp = T + p * mg4;
          @YT@ *yp = yg + p0 + p;
          for (m = 0; m < mg; m += 16) {
            int32_t v[16];
            if (m + 16 <= mg) {
              for (j = 0; j < 16; ++j)
                v[j] = gp_rq1d_@YTAG@(tp[m + j], dg[m + j], cp[m + j], zy, qmin, qmax);
              for (j = 0; j < 16; ++j) yp[(long)(m + j) * P] = (@YT@)v[j];
            } else {
              for (j = 0; j < mg - m; ++j)
                yp[(long)(m + j) * P] =
                    (@YT@)gp_rq1d_@YTAG@(tp[m + j], dg[m + j], cp[m + j], zy, qmin, qmax);
            }
          }
        }
      }
    }
  }
}
"""

KERNELS = r"""
/* XS[HP][WP][KC] = x[c][r - ph][col - pw] - zx for the group's cg channels, 0 outside */
static void gp_q8nhwc_@TAG@(const @XT@ *x, int16_t *xs, int cg, int H, int W, int HP, int WP,
                           int KC, int ph, int pw, int zx)
{
  const int r0 = gp_imax(0, ph), r1 = gp_imin(HP, H + ph);
  const int c0 = gp_imax(0, pw), c1 = gp_imin(WP, W + pw);
  int c, r, col;
  if (r0 > 0 || c0 > 0 || r1 < HP || c1 < WP || KC > cg)
    memset(xs, 0, (size_t)HP * WP * KC * sizeof(int16_t));
  for (c = 0; c < cg; ++c)
    for (r = r0; r < r1; ++r) {
      const @XT@ *xr = x + ((long)c * H + r - ph) * W;
      int16_t *sr = xs + (long)r * WP * KC + c;
      for (col = c0; col < c1; ++col) sr[(long)col * KC] = (int16_t)((int32_t)xr[col - pw] - zx);
    }
}

/* scratch: T (int32, MG4 x PT), then XS, then (unless direct) one tile of rows R */
GP_NOINLINE static void gp_q8conv_@TAG@(const @XT@ *x, const @WT@ *wp, const int32_t *b, @YT@ *y,
                           int32_t *scratch, const uint32_t *ra, int C, int H, int W, int M,
                           int OH, int OW, int KH, int KW, int sh, int sw, int dh, int dw,
                           int ph, int pw, int G, int KP, int PT, int zx, const int32_t *qm,
                           const int32_t *qs, int zy, int qmin, int qmax)
{
  const int cg = C / G, mg = M / G, mg4 = (mg + 3) / 4 * 4;
  const int HP = (OH - 1) * sh + (KH - 1) * dh + 1, WP = (OW - 1) * sw + (KW - 1) * dw + 1;
  const long P = (long)OH * OW;
  const int direct = KH == 1 && KW == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  const int KC = direct ? KP : cg;
  int32_t *T = scratch;
  int16_t *xs = (int16_t *)(void *)(scratch + (long)mg4 * PT), *R = xs + (long)HP * WP * KC;
  int g, kh, kw, m;
  long p0, p, k;
  for (g = 0; g < G; ++g) {
    const @WT@ *wg = wp + (long)g * mg4 * KP;
    const int32_t *bg = b ? b + g * mg : 0;
    @YT@ *yg = y + (long)g * mg * P;
    gp_q8nhwc_@TAG@(x + (long)g * cg * H * W, xs, cg, H, W, HP, WP, KC, ph, pw, zx);
    if (!direct)  /* the tail [KH * KW * cg, KP) of each row stays 0 */
      memset(R, 0, (size_t)PT * KP * sizeof(int16_t));
    for (p0 = 0; p0 < P; p0 += PT) {
      const int np = (int)(P - p0 < PT ? P - p0 : PT);
      if (!direct)
        for (p = 0; p < np; ++p) {
          const int oh = (int)((p0 + p) / OW), ow = (int)((p0 + p) % OW);
          int16_t *row = R + p * KP;
          for (kh = 0; kh < KH; ++kh) {
            const int16_t *src = xs + ((long)(oh * sh + kh * dh) * WP + (long)ow * sw) * cg;
            if (dw == 1) {  /* a loop, not memcpy: rows of a few channels are short */
              int16_t *dst = row + (long)kh * KW * cg;
              for (k = 0; k < (long)KW * cg; ++k) dst[k] = src[k];
            } else {
              for (kw = 0; kw < KW; ++kw)
                memcpy(row + ((long)kh * KW + kw) * cg, src + (long)kw * dw * cg,
                       (size_t)cg * sizeof(int16_t));
            }
          }
        }
      gp_q8dot_@TAG@(direct ? xs + p0 * KP : R, np, wg, mg, KP, bg, T, PT);
      for (m = 0; m < mg; ++m)
        gp_requant_row_@YTAG@(T + (long)m * PT, yg + (long)m * P + p0, np, qm[g * mg + m],
                              qs[g * mg + m], ra[g * mg + m], zy, qmin, qmax);
    }
  }
}
"""

POINTWISE = r"""
/* 1x1, stride 1, unpadded: Y[m][p] = b[m] + sum_c w[m][c] (x[c][p] - zx) over 16 pixels x 6
   output channels held in registers (weights [M/6][C][6]), exactly in float (portable) or
   int32, requantised block by block where dm (qm * 2^-t per channel) and cap are given
   (portable path), else into the int32 tile T[6][P16], requantised a channel row at a time
   once the 6 rows are complete. With GP_SIMD on AVX2: channel pairs of the input go to xs as int16
   [C/2][P16][2] and each pair of products is one vpmaddwd (same integers). */
GP_NOINLINE GP_WIDE static void gp_q8pw_@TAG@(const @XT@ *x, const @WT@ *wp, const int32_t *b, @YT@ *y,
                         int16_t *xs, int32_t *T, const uint32_t *ra, const double *dm,
                         const int32_t *cap, int C, int M, long P, int zx,
                         const int32_t *qm, const int32_t *qs, int zy, int qmin, int qmax)
{
  const int nmb = (M + 5) / 6;
  int mb, r, c;
  long p0, j;
#if defined(GP_SIMD) && defined(__AVX2__)
  (void)dm;
  (void)cap;
  const int C2 = (C + 1) / 2;
  const long P16 = (P + 15) / 16 * 16;
  int32_t wl[@KPW2@ * 6];
  for (c = 0; c < C2; ++c)
    for (j = 0; j < P16; ++j) {
      xs[((long)c * P16 + j) * 2] = (int16_t)(j < P ? (int32_t)x[2L * c * P + j] - zx : 0);
      xs[((long)c * P16 + j) * 2 + 1] =
          (int16_t)(j < P && 2 * c + 1 < C ? (int32_t)x[(2L * c + 1) * P + j] - zx : 0);
    }
  for (mb = 0; mb < nmb; ++mb) {
    const @WT@ *wb = wp + (long)mb * C * 6;
    const int m0 = mb * 6, mc = gp_imin(6, M - m0);
    for (c = 0; c < C2; ++c)
      for (r = 0; r < 6; ++r) {
        const uint32_t lo = (uint16_t)wb[2 * c * 6 + r];
        const uint32_t hi = 2 * c + 1 < C ? (uint16_t)wb[(2 * c + 1) * 6 + r] : 0u;
        wl[c * 6 + r] = (int32_t)(lo | hi << 16);
      }
    for (p0 = 0; p0 < P; p0 += 16) {
      __m256i acc[6][2];
      for (r = 0; r < 6; ++r)
        acc[r][0] = acc[r][1] = _mm256_set1_epi32((b && r < mc) ? b[m0 + r] : 0);
      for (c = 0; c < C2; ++c) {
        const int16_t *xp = xs + ((long)c * P16 + p0) * 2;
        const __m256i xa = _mm256_loadu_si256((const __m256i *)(const void *)xp);
        const __m256i xb = _mm256_loadu_si256((const __m256i *)(const void *)(xp + 16));
        for (r = 0; r < 6; ++r) {
          const __m256i wv = _mm256_set1_epi32(wl[c * 6 + r]);
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(xa, wv));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(xb, wv));
        }
      }
      for (r = 0; r < mc; ++r) {
        _mm256_storeu_si256((__m256i *)(void *)(T + r * P16 + p0), acc[r][0]);
        _mm256_storeu_si256((__m256i *)(void *)(T + r * P16 + p0 + 8), acc[r][1]);
      }
    }
    for (r = 0; r < mc; ++r)
      gp_requant_row_@YTAG@(T + r * P16, y + (long)(m0 + r) * P, P, qm[m0 + r], qs[m0 + r],
                            ra[m0 + r], zy, qmin, qmax);
  }
#else
  /* portable: every partial sum is an integer below 2^24 in magnitude (the weights pass
     f32_exact), so float arithmetic computes it exactly, at the speed of the float kernel;
     the input goes to scratch as float x - zx */
  float *xf = (float *)(void *)xs, wl[@KPW@ * 6];
  const long P16 = (P + 15) / 16 * 16;
  for (j = 0; j < (long)C * P; ++j) xf[j] = (float)((int32_t)x[j] - zx);
  for (mb = 0; mb < nmb; ++mb) {
    const @WT@ *wb = wp + (long)mb * C * 6;
    const int m0 = mb * 6, mc = gp_imin(6, M - m0);
    for (j = 0; j < (long)C * 6; ++j) wl[j] = (float)wb[j];
    for (p0 = 0; p0 < P; p0 += 16) {
      const long np = P - p0 < 16 ? P - p0 : 16;
      float acc[6][16];
      for (r = 0; r < 6; ++r)
        for (j = 0; j < 16; ++j) acc[r][j] = 0.f;
      if (np == 16) {
        for (c = 0; c < C; ++c) {
          const float *xr = xf + (long)c * P + p0;
          for (r = 0; r < 6; ++r) {
            const float wv = wl[c * 6 + r];
            GP_NOUNROLL for (j = 0; j < 16; ++j) acc[r][j] = GP_FMAF(wv, xr[j], acc[r][j]);
          }
        }
      } else {
        for (c = 0; c < C; ++c) {
          const float *xr = xf + (long)c * P + p0;
          for (r = 0; r < 6; ++r) {
            const float wv = wl[c * 6 + r];
            for (j = 0; j < np; ++j) acc[r][j] = GP_FMAF(wv, xr[j], acc[r][j]);
          }
        }
      }
      for (r = 0; r < mc; ++r) {
        const int32_t bv = b ? b[m0 + r] : 0;
        if (dm) {  /* requantised here (every shift on the double path): no int32 tile */
          @YT@ *yr = y + (long)(m0 + r) * P + p0;
          int32_t v[16];
          for (j = 0; j < 16; ++j)
            v[j] = gp_rq1d_@YTAG@(bv + (int32_t)acc[r][j], dm[m0 + r], cap[m0 + r], zy, qmin,
                                  qmax);
          if (np == 16) {
            for (j = 0; j < 16; ++j) yr[j] = (@YT@)v[j];
          } else {
            for (j = 0; j < np; ++j) yr[j] = (@YT@)v[j];
          }
        } else {
          for (j = 0; j < 16; ++j) T[r * P16 + p0 + j] = bv + (int32_t)acc[r][j];
        }
      }
    }
    for (r = 0; r < mc && !dm; ++r)
      gp_requant_row_@YTAG@(T + r * P16, y + (long)(m0 + r) * P, P, qm[m0 + r], qs[m0 + r],
                            ra[m0 + r], zy, qmin, qmax);
  }
#endif
}
"""

COL = r"""
/* col[k][p] = x[c][oh * sh - ph + kh * dh][ow * sw - pw + kw * dw] for k = (c, kh, kw), and zx
   (x - zx = 0: what a tap outside the input contributes) where the tap falls outside */
static void gp_q8col_@XTAG@(const @XT@ *x, @XT@ *col, int C, int H, int W, int OH, int OW,
                           int KH, int KW, int sh, int sw, int dh, int dw, int ph, int pw, int zx)
{
  int c, kh, kw, oh, ow;
  for (c = 0; c < C; ++c)
    for (kh = 0; kh < KH; ++kh)
      for (kw = 0; kw < KW; ++kw)
        for (oh = 0; oh < OH; ++oh) {
          const int ih = oh * sh - ph + kh * dh;
          const @XT@ *xr = x + ((long)c * H + ih) * W;
          @XT@ *dst = col + (((long)(c * KH + kh) * KW + kw) * OH + oh) * OW;
          for (ow = 0; ow < OW; ++ow) {
            const int iw = ow * sw - pw + kw * dw;
            dst[ow] = ih >= 0 && ih < H && iw >= 0 && iw < W ? xr[iw] : (@XT@)zx;
          }
        }
}
"""

FC = r"""
/* y[r][n] = out(b[n] + sum_k w[n][k] (x[r][k] - zx)) for R rows of K values, PT rows at a
   time: x - zx to int16 rows XS[PT][KP] (zero past K), T[N4][PT] = gp_q8dot, then the
   output stage of the generic kernel (requantised, or scaled to float). scratch: T (int32),
   then XS. */
GP_NOINLINE static void gp_q8fc_@TAG@(const @XT@ *x, const @WT@ *wp, const int32_t *b, @YT@ *y,
                         int32_t *scratch, int R, int N, int K, int KP, int PT, QARGS)
{
  int32_t *T = scratch;
  int16_t *xs = (int16_t *)(void *)(scratch + (long)(N + 3) / 4 * 4 * PT);
  int r0, r, n, k;
  for (r0 = 0; r0 < R; r0 += PT) {
    const int nr = R - r0 < PT ? R - r0 : PT;
    for (r = 0; r < nr; ++r) {
      const @XT@ *xr = x + (long)(r0 + r) * K;
      int16_t *sr = xs + (long)r * KP;
      for (k = 0; k < K; ++k) sr[k] = (int16_t)((int32_t)xr[k] - zx);
      for (; k < KP; ++k) sr[k] = 0;
    }
    gp_q8dot_@TAG@(xs, nr, wp, N, KP, b, T, PT);
    for (r = 0; r < nr; ++r)
      for (n = 0; n < N; ++n)
        y[(long)(r0 + r) * N + n] = OUT(T[(long)n * PT + r], n);
  }
}
"""

_TAG = {"int8_t": "s8", "uint8_t": "u8", "int16_t": "s16", "float": "f32"}
KPW = 512  # a pointwise conv over at most this many input channels runs gp_q8pw
PMIN = 32  # ... and at least this many pixels
KCOL = 64  # a conv with at most this many taps x channels (and PMIN pixels): im2col + gp_q8pw


def kp(geo: ConvGeometry) -> int:
    """Values per row: ``KH * KW * C/G`` rounded up to a multiple of 16."""
    k = geo.KH * geo.KW * (geo.C // geo.G)
    return -(-k // 16) * 16


def _direct(geo: ConvGeometry) -> bool:
    return geo.KH == geo.KW == 1 and geo.sh == geo.sw == 1 and geo.ph == geo.pw == 0


def _tile(geo: ConvGeometry) -> int:
    """Pixels per im2col tile: all of them if they fit ``TILE_BYTES``, else a multiple of PB
    (at least 8 blocks, so that a layer with few pixels reads its weights once)."""
    p = geo.OH * geo.OW
    fit = max(8 * PB, TILE_BYTES // (2 * kp(geo)) // PB * PB)
    return min(-(-p // PB) * PB, fit)


def applicable(geo: ConvGeometry, w: np.ndarray, bias: np.ndarray | None) -> bool:
    """Not depthwise, and no partial sum leaves int32: ``|b| + sum |w| * 255`` (inputs
    ``x - zx`` span at most 255 either way); float-exact weights for the pixel-vectorised
    kernel (its portable form sums in float)."""
    if geo.depthwise or ((pointwise(geo) or smallk(geo)) and not f32_exact(w)):
        return False
    return fits_int32(w, bias)


def fits_int32(w: np.ndarray, bias: np.ndarray | None) -> bool:
    """``|b[m]| + 255 * sum_k |w[m][k]| < 2^31`` for every output channel ``m`` (axis 0)."""
    wabs = np.abs(w.astype(np.int64)).reshape(w.shape[0], -1).sum(axis=1) * 255
    b = np.zeros(w.shape[0], np.int64) if bias is None else np.abs(bias.astype(np.int64))
    return bool((b + wabs).max(initial=0) < 2**31)


def _pw_bytes(c: int, p: int) -> int:
    """Scratch of gp_q8pw over ``c`` channels of ``p`` pixels: int16 channel pairs (GP_SIMD)
    or float (portable), rounded up to 64 bytes, then the int32 tile ``T[6][P16]``."""
    p16 = -(-p // 16) * 16
    return _xs_bytes(c, p) + 6 * p16 * 4


def _xs_bytes(c: int, p: int) -> int:
    p16 = -(-p // 16) * 16
    return -(-max((c + 1) // 2 * 2 * p16 * 2, c * p * 4) // 64) * 64


def _col_bytes(geo: ConvGeometry) -> int:
    """The im2col matrix of the small-K path (one byte per value), rounded up to 64."""
    return -(-(geo.KH * geo.KW * geo.C * geo.OH * geo.OW) // 64) * 64


def scratch_bytes(geo: ConvGeometry, e: dict | None = None) -> int:
    """The int32 output tile, the channels-last padded input of one group and (unless the
    rows come straight from it) one tile of rows (int16; bytes for the u8 kernel, ``e``
    given and :func:`u8`); for the pointwise kernel, its input in channel pairs (GP_SIMD) or
    in float; for the small-K path, the im2col matrix first."""
    if e is not None and u8(geo, e):
        return _scratch_u(geo)
    if pointwise(geo):
        return _pw_bytes(geo.C, geo.H * geo.W)
    if smallk(geo):
        return _col_bytes(geo) + _pw_bytes(geo.KH * geo.KW * geo.C, geo.OH * geo.OW)
    tile = -(-(geo.M // geo.G) // MB) * MB * _tile(geo) * 4
    if _direct(geo):
        return tile + geo.H * geo.W * kp(geo) * 2
    hp = (geo.OH - 1) * geo.sh + (geo.KH - 1) * geo.dh + 1
    wp = (geo.OW - 1) * geo.sw + (geo.KW - 1) * geo.dw + 1
    return tile + (hp * wp * (geo.C // geo.G) + _tile(geo) * kp(geo)) * 2


def u8(geo: ConvGeometry, e: dict) -> bool:
    """Whether the GEMM conv runs on u8 x s8 products (``gp_q8convu``): int8 weights."""
    return e["wt"] == "int8_t" and not (pointwise(geo) or smallk(geo))


def kp_u(geo: ConvGeometry) -> int:
    """Bytes per row of ``gp_q8convu``: ``KH * KW * C/G`` rounded up to a multiple of 64."""
    k = geo.KH * geo.KW * (geo.C // geo.G)
    return -(-k // 64) * 64


def _tile_u(geo: ConvGeometry) -> int:
    """Pixels per tile of ``gp_q8convu``: all of them if their rows fit ``TILE_BYTES``, else
    a multiple of 4 (at least 32)."""
    p = geo.OH * geo.OW
    return min(-(-p // 4) * 4, max(32, TILE_BYTES // kp_u(geo) // 4 * 4))


def _scratch_u(geo: ConvGeometry) -> int:
    tile = -(-(geo.M // geo.G) // MB) * MB * _tile_u(geo) * 4
    if _direct(geo):
        return tile + geo.H * geo.W * kp_u(geo)
    hp = (geo.OH - 1) * geo.sh + (geo.KH - 1) * geo.dh + 1
    wp = (geo.OW - 1) * geo.sw + (geo.KW - 1) * geo.dw + 1
    return tile + hp * wp * (geo.C // geo.G) + _tile_u(geo) * kp_u(geo)


def u_zero(xt: str, zx: int) -> int:
    """``u`` of the input zero point: ``zx + 128`` for int8 inputs, ``zx`` for uint8."""
    return zx + (128 if xt == "int8_t" else 0)


def bias_u8(w: np.ndarray, bias: np.ndarray | None, uz: int) -> np.ndarray:
    """``b[m] - uz * sum_k w[m][k]``: ``sum_k w (x - zx) = sum_k w u - uz sum_k w``."""
    ws = w.astype(np.int64).reshape(w.shape[0], -1).sum(axis=1)
    b = np.zeros(w.shape[0], np.int64) if bias is None else bias.astype(np.int64)
    out = b - uz * ws
    assert np.abs(out).max(initial=0) < 2**31, "bias_u8: outside int32 (fits_int32 was checked)"
    return out.astype(np.int32)


def pack(w: np.ndarray, groups: int, kp_: int | None = None) -> np.ndarray:
    """``[M][cg][KH][KW]`` -> ``[G][MG4][KP]``: each output channel's weights in
    ``(kh, kw, c)`` order, zero-padded to ``KP`` values (by default a multiple of 16) and to a
    multiple of 4 channels."""
    m, cg = w.shape[0], w.shape[1]
    taps = int(np.prod(w.shape[2:], dtype=np.int64))
    mg = m // groups
    k = taps * cg
    kp_ = kp_ or -(-k // 16) * 16
    mg4 = -(-mg // MB) * MB
    wt = w.reshape(groups, mg, cg, taps).transpose(0, 1, 3, 2).reshape(groups, mg, k)
    out = np.zeros((groups, mg4, kp_), w.dtype)
    out[:, :mg, :k] = wt
    return out


def source(xt: str, wt: str, yt: str, kind: str = "conv") -> tuple[str, str]:
    """(function name, C source) for the given C types: ``conv`` (the im2col + dot product
    driver and its input helper), ``fc`` (rows times weights), ``dot`` (their shared dot
    products: emit it first), ``pw`` (the pixel-vectorised 1x1 kernel) or ``col`` (the
    im2col of the small-K path, by input type only)."""
    tag = "".join(_TAG[t] for t in (xt, wt, yt))
    kinds = {"conv": KERNELS, "fc": FC, "dot": DOT, "pw": POINTWISE, "col": COL}
    code = {**kinds, "convu": KERNELS_U, "dotu": DOTU}[kind]
    if kind == "dotu":
        return "gp_q8dotu", code
    code = code.replace("@UX@", "128" if xt == "int8_t" else "0")
    if kind == "fc":  # requantised to int8/uint8 or, for a float output, scaled
        code = output_stage(code, yt)
    src = code.replace("@TAG@", tag).replace("@XTAG@", _TAG[xt])
    src = src.replace("@YTAG@", _TAG[yt]).replace("@KPW2@", str((KPW + 1) // 2))
    src = src.replace("@KPW@", str(KPW))
    src = src.replace("@XT@", xt).replace("@WT@", wt).replace("@YT@", yt)
    return (f"gp_q8col_{_TAG[xt]}" if kind == "col" else f"gp_q8{kind}_{tag}"), src


def pointwise(geo: ConvGeometry) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped conv over at most ``KPW`` input channels and at
    least ``PMIN`` pixels: vectorised over pixels (no horizontal sums, whole rows
    requantised at once) rather than the GEMM's dot products."""
    return _direct(geo) and geo.G == 1 and geo.C <= KPW and geo.H * geo.W >= PMIN


def smallk(geo: ConvGeometry) -> bool:
    """Any other ungrouped conv whose dot products are at most ``KCOL`` long (a first layer
    over 3 channels) over at least ``PMIN`` pixels: im2col as ``[K][P]`` (taps outside the
    input read ``zx``), then the pixel-vectorised kernel over ``K`` channels."""
    k = geo.KH * geo.KW * geo.C
    return not _direct(geo) and geo.G == 1 and k <= KCOL and geo.OH * geo.OW >= PMIN


def emit(cg, geo: ConvGeometry, e: dict, bias: str, q: str) -> str:
    """The call of the kernel on ``x``/``y`` (declared by the caller) for each image."""
    pw, sk = pointwise(geo), smallk(geo)
    xt, wt, yt = e["xt"], e["wt"], e["yt"]
    cg.helper("simd", SIMD)
    cg.helper(*requant_row(yt))
    ra = cg.weight(saturation_caps(e["qm"], e["qs"]), "requant_caps")
    loop = f"  int n;\n  for (n = 0; n < {geo.N}; ++n) {{\n"
    if u8(geo, e):
        return loop + _emit_u(cg, geo, e, ra, q)
    if not (pw or sk):
        cg.helper(*source(xt, wt, yt, "dot"))
    if pw or sk:  # exact integers in float: a fused multiply-add rounds nothing either
        cg.helper("wide", WIDE)
        cg.helper("fma", csrc_float.FMA)
        cg.helper(*requant_lane(yt))
    fn, src = source(xt, wt, yt, "pw" if pw or sk else "conv")
    cg.helper(fn, src)
    xn, yn = f"x + (long)n * {geo.x_size}", f"y + (long)n * {geo.y_size}"
    if pw or sk:
        k = geo.KH * geo.KW * geo.C
        w = e["w"].reshape(geo.M, k)
        wp = np.zeros((-(-geo.M // 6) * 6, k), w.dtype)
        wp[: geo.M] = w
        wsym = cg.weight(wp.reshape(-1, 6, k).transpose(0, 2, 1).reshape(-1), "q8pw_w_packed_6")
        s = cg.scratch("unsigned char")
        lanes = lane_tables(e["qm"], e["qs"])
        if lanes is not None:
            ra += f", {cg.weight(lanes[0], 'requant_dm')}, {cg.weight(lanes[1], 'requant_cap')}"
        else:
            ra += ", 0, 0"
        if pw:
            p = geo.H * geo.W
            t = f"(int32_t *)(void *)({s} + {_xs_bytes(geo.C, p)})"
            args = f"(int16_t *)(void *){s}, {t}, {ra}, {geo.C}, {geo.M}, {p}"
            return f"{loop}    {fn}({xn}, {wsym}, {bias}, {yn}, {args}, {q});\n  }}"
        col, csrc = source(xt, wt, yt, "col")
        cg.helper(col, csrc)
        g = geo
        xs = f"{s} + {_col_bytes(g)}"
        t = f"(int32_t *)(void *)({xs} + {_xs_bytes(k, g.OH * g.OW)})"
        return (
            f"{loop}    {col}({xn}, ({xt} *)(void *){s}, {g.C}, {g.H}, {g.W}, {g.OH}, {g.OW}, "
            f"{g.KH}, {g.KW}, {g.sh}, {g.sw}, {g.dh}, {g.dw}, {g.ph}, {g.pw}, {e['zx']});\n"
            f"    {fn}((const {xt} *)(void *){s}, {wsym}, {bias}, {yn}, "
            f"(int16_t *)(void *)({xs}), {t}, {ra}, {k}, {g.M}, {g.OH * g.OW}, "
            f"{q});\n  }}"
        )
    wsym = cg.weight(pack(e["w"], geo.G).reshape(-1), f"q8conv_w_packed_{kp(geo)}")
    args = f"{cg.scratch('int32_t')}, {ra}, {geo.args()}, {kp(geo)}, {_tile(geo)}"
    return f"{loop}    {fn}({xn}, {wsym}, {bias}, {yn}, {args}, {q});\n  }}"


def _emit_u(cg, geo: ConvGeometry, e: dict, ra: str, q: str) -> str:
    xt, yt = e["xt"], e["yt"]
    cg.helper(*requant_lane(yt))
    cg.helper(*source(xt, "int8_t", yt, "dotu"))
    fn, src = source(xt, "int8_t", yt, "convu")
    cg.helper(fn, src)
    kpu = kp_u(geo)
    wsym = cg.weight(pack(e["w"], geo.G, kpu).reshape(-1), f"q8conv_w_packed_u{kpu}")
    bsym = cg.weight(bias_u8(e["w"], e["bias"], u_zero(xt, e["zx"])), "conv_bias_u8")
    lanes = lane_tables(e["qm"], e["qs"])
    dm, cap = "0", "0"
    if lanes is not None:
        dm, cap = cg.weight(lanes[0], "requant_dm"), cg.weight(lanes[1], "requant_cap")
    xn, yn = f"x + (long)n * {geo.x_size}", f"y + (long)n * {geo.y_size}"
    args = f"{cg.scratch('int32_t')}, {ra}, {dm}, {cap}, {geo.args()}, {kpu}, {_tile_u(geo)}"
    return f"    {fn}({xn}, {wsym}, {bsym}, {yn}, {args}, {q});\n  }}"


# -- fully-connected layers (Gemm / MatMul with constant weights) ----------------------------
def _fc_rows(rows: int, n: int) -> int:
    """Rows per tile: at most 24, fewer when the int32 tile would pass 64 KiB (at least 3)."""
    n4 = -(-n // MB) * MB
    return min(rows, max(PB, min(24, (1 << 16) // (4 * n4))))


def fc_scratch_bytes(n: int, k: int, rows: int) -> int:
    """T (int32, ``N4 x PT``) and PT int16 rows of ``KP`` values."""
    pt = _fc_rows(rows, n)
    return (-(-n // MB) * MB * pt * 4) + pt * (-(-k // 16) * 16) * 2


def emit_fc(cg, e: dict, x: str, y: str, bias: str, q: str) -> str:
    """The call of gp_q8fc for ``rows`` rows of ``x [rows][K]`` and weights ``w [N][K]``
    (its output stage, :func:`.csrc_int8.output_helper`, is emitted by the caller)."""
    xt, wt, yt = e["xt"], e["wt"], e["yt"]
    w = e["w"]
    n, k = w.shape
    cg.helper(*source(xt, wt, yt, "dot"))
    fn, src = source(xt, wt, yt, "fc")
    cg.helper(fn, src)
    kp_ = -(-k // 16) * 16
    wsym = cg.weight(pack(w.reshape(n, k, 1, 1), 1).reshape(-1), f"q8fc_w_packed_{kp_}")
    rows = e["rows"]
    return (
        f"  {fn}({x}, {wsym}, {bias}, {y}, {cg.scratch('int32_t')}, {rows}, {n}, {k}, "
        f"{kp_}, {_fc_rows(rows, n)}, {q});"
    )
