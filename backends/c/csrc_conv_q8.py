"""C source of the int8 convolution and fully-connected kernels of :mod:`.conv_q8` (the
algorithms, blocking and exactness arguments are described there).

Placeholders ``@XT@``/``@WT@``/``@YT@`` (C types), ``@TAG@``/``@XTAG@``/``@YTAG@`` (their
short names), ``@KPW@``/``@KPW2@`` and ``@UX@`` are filled in by :func:`.conv_q8.source`.
"""

from __future__ import annotations

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
