"""C source of the integer helpers: requantisation and the int8/uint8 kernels.

Placeholders ``XT`` (input), ``WT`` (weights), ``YT`` (output) and ``TAG`` are substituted per
type combination. Accumulation is int32; ``gp_requant_clamp`` scales an int32 by a real
multiplier ``M = qm * 2^-(31 + qs)`` (``qm`` in [2^30, 2^31), ``31 + qs`` in [1, 62]) with one
rounding (half away from zero) in 64-bit arithmetic, adds the output zero point and clamps:
the fixed-point requantisation of gemmlowp / TFLite / CMSIS-NN (their single-rounding
variant)."""

from __future__ import annotations

import re

import numpy as np

from .csrc_float import pool_body

# round(acc * qm / 2^t), t = 31 + qs in [1, 62], halves away from zero: for p = acc * qm,
# (p + 2^(t-1)) >> t when p >= 0, -((-p + 2^(t-1)) >> t) when p < 0, which equals
# floor((p + 2^(t-1) - [p < 0]) / 2^t) in both cases; it is computed on that numerator plus
# 2^62 (non-negative, < 2^63) with a logical shift, so that compilers vectorise it
REQUANT = r"""
static int32_t gp_requant_clamp(int32_t acc, int32_t qm, int32_t qs, int zy, int qmin, int qmax)
{
  const int t = 31 + qs;
  const int64_t p = (int64_t)acc * qm;
  const uint64_t u = (uint64_t)(p + ((int64_t)1 << (t - 1)) - (p < 0) + ((int64_t)1 << 62));
  const int64_t v = (int64_t)(u >> t) - ((int64_t)1 << (62 - t)) + zy;
  return (int32_t)(v < qmin ? qmin : (v > qmax ? qmax : v));
}
"""

# the same for a row of outputs of one channel, in a form compilers vectorise better: |acc| is
# capped at amax (:func:`saturation_caps`), past which every output saturates
# (|v| >= 2^10 > any |q - zy|), so
# (|acc| * qm + 2^(t-1)) >> t fits 32 bits; v = sign(acc) * that is round-half-away-from-zero
# of acc * qm / 2^t, the value gp_requant_clamp computes. ``YT`` is the output type. With
# GP_SIMD defined on an AVX2 target, 8 outputs at a time with intrinsics (the same integers).
REQUANT_LANE = r"""
#ifndef GP_RQ1D_YTAG
#define GP_RQ1D_YTAG
#if defined(FP_FAST_FMA)
#define GP_FMA_YTAG(a, b, c) fma(a, b, c)
#else
#define GP_FMA_YTAG(a, b, c) ((a) * (b) + (c))
#endif
/* one output of the double path (masks, no branches: GCC vectorises a block of these); |s|
   as uint32 (|INT32_MIN| fits), capped at cap (>= 0), so its int32 conversion is safe */
static int32_t gp_rq1d_YTAG(int32_t s, double dm, int32_t cap, int zy, int qmin, int qmax)
{
  const int32_t neg = -(int32_t)(s < 0);
  uint32_t a = (uint32_t)(s ^ neg) - (uint32_t)neg;
  int32_t r, q;
  a = a < (uint32_t)cap ? a : (uint32_t)cap;
  r = (int32_t)GP_FMA_YTAG((double)(int32_t)a, dm, 0.5);
  q = ((r ^ neg) - neg) + zy;
  q = q > qmin ? q : qmin;
  return q < qmax ? q : qmax;
}
#endif
"""
REQUANT_ROW = (
    REQUANT_LANE
    + r"""
static void gp_requant_row_YTAG(const int32_t *acc, YT *y, long n, int32_t qm, int32_t qs,
                                uint32_t amax, int zy, int qmin, int qmax)
{
  const int t = 31 + qs;
  const uint64_t h = (uint64_t)1 << (t - 1), um = (uint32_t)qm;
  long j = 0;
  if (t <= 42) {  /* exact in double: see DOUBLE_NOTE */
    union { uint64_t u; double d; } p2;  /* 2^-t, built (a division costs ~20 cycles) */
    double dm;
    const int32_t cap = amax > 2147483647u ? 2147483647 : (int32_t)amax;
    p2.u = (uint64_t)(1023 - t) << 52;
    dm = (double)qm * p2.d;
    for (; j < n; j += 16) {
      const long m = n - j < 16 ? n - j : 16;
      int k;
      if (m == 16) {
        int32_t v[16];
        for (k = 0; k < 16; ++k) v[k] = gp_rq1d_YTAG(acc[j + k], dm, cap, zy, qmin, qmax);
        for (k = 0; k < 16; ++k) y[j + k] = (YT)v[k];
      } else {  /* a short row or the tail: scalar */
        for (k = 0; k < m; ++k) y[j + k] = (YT)gp_rq1d_YTAG(acc[j + k], dm, cap, zy, qmin, qmax);
      }
    }
    return;
  }
#if defined(GP_SIMD) && defined(__AVX2__)
  {
    const __m256i vm = _mm256_set1_epi32(qm), vh = _mm256_set1_epi64x((long long)h);
    const __m256i va = _mm256_set1_epi32((int)amax), vz = _mm256_set1_epi32(zy);
    const __m256i vlo = _mm256_set1_epi32(qmin), vhi = _mm256_set1_epi32(qmax);
    const __m128i vt = _mm_cvtsi32_si128(t);
    for (; j + 8 <= n; j += 8) {
      const __m256i s = _mm256_loadu_si256((const __m256i *)(acc + j));
      const __m256i a = _mm256_min_epu32(_mm256_abs_epi32(s), va);
      const __m256i ev = _mm256_srl_epi64(_mm256_add_epi64(_mm256_mul_epu32(a, vm), vh), vt);
      const __m256i od = _mm256_srl_epi64(
          _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), vm), vh), vt);
      __m256i v = _mm256_blend_epi32(ev, _mm256_slli_epi64(od, 32), 0xAA);
      __m128i w;
      v = _mm256_add_epi32(_mm256_sign_epi32(v, s), vz);
      v = _mm256_min_epi32(_mm256_max_epi32(v, vlo), vhi);
      w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      _mm_storel_epi64((__m128i *)(void *)(y + j), PACK(w, w));
    }
  }
#endif
  for (; j < n; j += 16) {  /* blocks of 16: a fixed count vectorises for any n */
    const long m = n - j < 16 ? n - j : 16;
    int32_t v[16];
    int k;
    for (k = 0; k < 16; ++k) {
      const int32_t s = k < m ? acc[j + k] : 0;
      uint32_t a = s < 0 ? 0u - (uint32_t)s : (uint32_t)s;
      int32_t r;
      a = a < amax ? a : amax;
      r = (int32_t)(uint32_t)(((uint64_t)a * um + h) >> t);
      r = (s < 0 ? -r : r) + zy;
      v[k] = r < qmin ? qmin : (r > qmax ? qmax : r);
    }
    if (m == 16) {
      for (k = 0; k < 16; ++k) y[j + k] = (YT)v[k];
    } else {
      for (k = 0; k < m; ++k) y[j + k] = (YT)v[k];
    }
  }
}
"""
)

# DOUBLE_NOTE: when t <= 42, gp_requant_row works in double. acc is first clamped to
# [-amax, amax], which changes no output (from amax on every output saturates); with
# qm >= 2^30 that cap is at most 2^22 + 1 (qm == 0: every output is zy, dm is 0, the cap only
# has to fit int32), so |acc| * qm <= 2^(t + 10) + qm. Then |acc| * qm * 2^-t is exact in
# double (fewer than 53 significant bits), and so is that plus 0.5 (the integer
# |acc| * qm + 2^(t-1) < 2^53, scaled by 2^-t), with or without a fused multiply-add; the
# conversion truncates, which is floor for this non-negative value: the rounding of
# gp_requant_clamp (half away from zero, sign restored after), in a form compilers
# vectorise (int32 -> double, no 64-bit multiplies; 6x faster on rows of 1024 with GCC 12).
SIMD = r"""
#if defined(GP_SIMD) && defined(__AVX2__)
#include <immintrin.h>
#endif
"""


def saturation_caps(qm, qs) -> np.ndarray:
    """Per channel, ``amax = min(2^32 - 1, ceil(2^(t + 10) / qm))`` with ``t = 31 + qs``:
    every ``|acc| >= amax`` requantises to ``|v| >= 2^10``, beyond any int8 output (a cap
    above 2^31 never applies)."""
    out = []
    for m, s in zip(np.asarray(qm).reshape(-1).tolist(), np.asarray(qs).reshape(-1).tolist()):
        cap = -(-(1 << (31 + int(s) + 10)) // int(m)) if m > 0 else 2**32 - 1
        out.append(min(cap, 2**32 - 1))
    return np.array(out, np.uint32)


def lane_tables(qm, qs) -> tuple[np.ndarray, np.ndarray] | None:
    """Per channel ``qm * 2^-(31 + qs)`` (double, exact) and ``min(amax, 2^31 - 1)``: what
    ``gp_rq1d`` takes; None unless every shift is on the double path (``31 + qs <= 42``)."""
    qm, qs = np.asarray(qm).reshape(-1), np.asarray(qs).reshape(-1)
    if (qs > 11).any():
        return None
    dm = np.array([float(m) * 2.0 ** -(31 + int(t)) for m, t in zip(qm.tolist(), qs.tolist())])
    cap = np.minimum(saturation_caps(qm, qs).astype(np.int64), 2**31 - 1).astype(np.int32)
    return dm, cap


def f32_exact(w: np.ndarray) -> bool:
    """Whether float32 sums ``sum_k w[m][k] * (x_k - zx)`` exactly for every output channel
    ``m`` (first axis): each partial sum is an integer of magnitude at most
    ``255 * sum_k |w[m][k]|``, exact while that stays below 2^24."""
    wabs = np.abs(np.asarray(w, np.int64)).reshape(w.shape[0], -1).sum(axis=1)
    return bool(wabs.max(initial=0) * 255 < 2**24)


def requant_lane(yt: str) -> tuple[str, str]:
    """(helper key, C source) of ``gp_rq1d``, one output of the double path of
    ``gp_requant_row`` (``t <= 42``), for kernels that requantise across channels with
    ``dm = qm * 2^-t`` and ``cap = min(amax, 2^31 - 1)`` per channel."""
    tag = {"int8_t": "s8", "uint8_t": "u8"}[yt]
    return f"rq1d_{tag}", REQUANT_LANE.replace("YTAG", tag)


def requant_row(yt: str) -> tuple[str, str]:
    """(name, C source) of ``gp_requant_row`` for output type ``yt`` (emit :data:`SIMD`
    first)."""
    tag = {"int8_t": "s8", "uint8_t": "u8"}[yt]
    pack = "_mm_packs_epi16" if yt == "int8_t" else "_mm_packus_epi16"
    src = REQUANT_ROW.replace("YTAG", tag).replace("YT", yt).replace("PACK", pack)
    return f"gp_requant_row_{tag}", src


# (x - zx) goes through int16_t (it spans [-255, 255]): GCC 12 with -march=native on a VNNI
# CPU otherwise vectorises the uint8 case as an unsigned-by-signed byte dot product (vpdpbusd)
# of x itself, dropping the zero point: wrong outputs
QCONV = r"""
static void gp_qconv_TAG(const XT *x, const WT *w, const int32_t *b, YT *y,
                         int C, int H, int W, int M, int OH, int OW, int KH, int KW,
                         int sh, int sw, int dh, int dw, int ph, int pw, int G,
                         QARGS)
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
              acc += (int32_t)(int16_t)((int32_t)xc[(long)(ih0 + kh * dh) * W + iw0 + kw * dw] - zx)
                     * (int32_t)wc[kh * KW + kw];
        }
        y[((long)m * OH + oh) * OW + ow] = OUT(acc, m);
      }
    }
  }
}
"""

# rows of x [R][K] times packed weights [N/32][K][32]
QFC = r"""
static void gp_qfc_TAG(const XT *x, const WT *wp, const int32_t *b, YT *y, int R, int N, int K,
                       QARGS)
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
        y[(long)r * N + n0 + i] = OUT(acc[i], n0 + i);
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
    code = output_stage(code, yt)
    return code.replace("TAG", tag).replace("XT", xt).replace("YT", yt).replace("WT", wt)


# -- the output stage of conv / fully-connected kernels ---------------------------------------
# A kernel template ends its parameter list with ``QARGS`` (the input zero point and what the
# output stage reads) and writes each output as ``OUT(acc, n)``: int32 accumulator ``acc`` of
# output channel ``n``. An int8/uint8 output is requantised (``gp_requant_clamp``); a float
# output (an int8 layer whose result is not quantized again: ORT's QGemm with float output,
# MatMulIntegerToFloat) is ``float(acc) * sc[n]``, plus ``fb[n]`` when the layer has a float
# bias (an int32 bias is in ``acc`` already). ``sc[n]`` is the float32 product
# ``sx * sw[n]``, as ORT computes it; product and sum are two statements, so a compiler in ISO
# C mode (``-std=c99``: no contraction across statements) rounds each, as ORT's kernels do.
DEQUANT = r"""
static float gp_dequant_acc(int32_t acc, float sc, const float *fb, long n)
{
  const float p = (float)acc * sc;
  return fb ? p + fb[n] : p;
}
"""
REQUANT_ARGS = "int zx, const int32_t *qm, const int32_t *qs, int zy, int qmin, int qmax"
DEQUANT_ARGS = "int zx, const float *sc, const float *fb"
_OUT = re.compile(r"OUT\(([^,]+), ([^)]+)\)")


def output_args(yt: str) -> str:
    """The C parameters of the output stage for output type ``yt``."""
    return DEQUANT_ARGS if yt == "float" else REQUANT_ARGS


def output_stage(code: str, yt: str) -> str:
    """``code`` with ``QARGS`` and every ``OUT(acc, n)`` replaced for output type ``yt``
    (``int8_t``, ``uint8_t`` or ``float``). The kernel needs :data:`REQUANT` or
    :data:`DEQUANT` (:func:`output_helper`)."""
    if yt == "float":
        repl = r"gp_dequant_acc(\1, sc[\2], fb, \2)"
    else:
        repl = rf"({yt})gp_requant_clamp(\1, qm[\2], qs[\2], zy, qmin, qmax)"
    return _OUT.sub(repl, code).replace("QARGS", output_args(yt))


def output_helper(yt: str) -> tuple[str, str]:
    """(helper key, C source) of the function :func:`output_stage` calls."""
    return ("dequant", DEQUANT) if yt == "float" else ("requant", REQUANT)
