"""C source of the float helper functions (emitted once, only when a node uses them).

Every helper is ``static``, takes plain pointers and ints, touches no globals, and loops with
all bounds checked before indexing (no out-of-range pointer is ever formed)."""

from __future__ import annotations

# integer ceil/floor division for a possibly negative numerator and a positive denominator
# (macros: a helper a kernel does not call would trip -Wunused-function)
DIV = r"""
#define gp_cdiv(a, b) ((a) >= 0 ? ((a) + (b) - 1) / (b) : -((-(a)) / (b)))
#define gp_fdiv(a, b) ((a) >= 0 ? (a) / (b) : -((-(a) + (b) - 1) / (b)))
#define gp_imax(a, b) ((a) > (b) ? (a) : (b))
#define gp_imin(a, b) ((a) < (b) ? (a) : (b))
"""

# a * b + c with one rounding where the target has a fast fused multiply-add (C99's
# FP_FAST_FMAF, which <math.h> defines e.g. under GCC/Clang -mfma): in ISO C mode GCC does not
# contract ``acc += a * b`` by itself (-std=c99 implies -ffp-contract=off), so without this the
# vectorised inner loops of the float kernels issue a multiply and an add per term. Elsewhere,
# the plain expression (an fmaf without hardware support would be a slow library call).
FMA = r"""
#if defined(FP_FAST_FMAF)
#define GP_FMAF(a, b, c) fmaf(a, b, c)
#else
#define GP_FMAF(a, b, c) ((a) * (b) + (c))
#endif
"""

# activation applied to a freshly written block: act 0 none, 1 relu, 2 clip(lo, hi)
ACT = r"""
static void gp_act_f32(float *y, long n, int act, float lo, float hi)
{
  long i;
  if (act == 1) {
    for (i = 0; i < n; ++i) y[i] = y[i] > 0.f ? y[i] : 0.f;
  } else if (act == 2) {
    for (i = 0; i < n; ++i) {
      float v = y[i] < lo ? lo : y[i];
      y[i] = v > hi ? hi : v;
    }
  }
}
"""

# y[j] = act(acc[j]) for a freshly computed block: one simple loop per activation, so that
# each vectorises (the branchy per-element form does not)
STORE_ACT = r"""
static void gp_store_act_f32(float *y, const float *acc, long n, int act, float lo, float hi)
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
"""

# the activation in place on a block of @N@ values (a fixed count: GCC vectorises it even
# inlined into a kernel, where it turns a loop of unknown count into compare-and-branch code)
ACT_BLOCK = r"""
static void gp_act_block_f32_@N@(float *a, int act, float lo, float hi)
{
  int j;
  if (act == 1) {
    GP_NOUNROLL for (j = 0; j < @N@; ++j) a[j] = a[j] > 0.f ? a[j] : 0.f;
  } else if (act == 2) {
    GP_NOUNROLL for (j = 0; j < @N@; ++j) {
      const float v = a[j] < lo ? lo : a[j];
      a[j] = v > hi ? hi : v;
    }
  }
}
"""

# direct convolution for weights in ONNX layout [M][C/G][KH][KW] (constant or not):
# per (output channel, input channel, tap) an axpy over the valid part of each output row.
CONV_GENERIC = r"""
static void gp_conv2d_f32(const float *x, const float *w, const float *b, float *y,
                          int C, int H, int W, int M, int OH, int OW, int KH, int KW,
                          int sh, int sw, int dh, int dw, int ph, int pw, int G)
{
  const int cg = C / G, mg = M / G;
  const long ohw = (long)OH * OW;
  int m, c, kh, kw, oh, ow;
  for (m = 0; m < M; ++m) {
    const int g = m / mg;
    float *yo = y + (long)m * ohw;
    const float bv = b ? b[m] : 0.f;
    long i;
    for (i = 0; i < ohw; ++i) yo[i] = bv;
    for (c = 0; c < cg; ++c) {
      const float *xc = x + (long)(g * cg + c) * H * W;
      const float *wc = w + ((long)m * cg + c) * KH * KW;
      for (kh = 0; kh < KH; ++kh) {
        const int oh0 = gp_imax(0, gp_cdiv(ph - kh * dh, sh));
        const int oh1 = gp_imin(OH, gp_fdiv(H - 1 + ph - kh * dh, sh) + 1);
        for (kw = 0; kw < KW; ++kw) {
          const float wv = wc[kh * KW + kw];
          const int ow0 = gp_imax(0, gp_cdiv(pw - kw * dw, sw));
          const int ow1 = gp_imin(OW, gp_fdiv(W - 1 + pw - kw * dw, sw) + 1);
          for (oh = oh0; oh < oh1; ++oh) {
            const long xb = (long)(oh * sh - ph + kh * dh) * W + kw * dw - pw;
            float *yr = yo + (long)oh * OW;
            if (sw == 1) {
              for (ow = ow0; ow < ow1; ++ow) yr[ow] += wv * xc[xb + ow];
            } else {
              for (ow = ow0; ow < ow1; ++ow) yr[ow] += wv * xc[xb + (long)ow * sw];
            }
          }
        }
      }
    }
  }
}
"""

# y[m][n] = sum_k A[m*sam + k*sak] * B[k*sbk + n*sbn]   (Y row-major M x N, overwritten)
GEMM = r"""
static void gp_gemm_f32(const float *A, long sam, long sak, const float *B, long sbk, long sbn,
                        float *Y, int M, int N, int K)
{
  int m, n, k;
  for (m = 0; m < M; ++m) {
    float *yr = Y + (long)m * N;
    for (n = 0; n < N; ++n) yr[n] = 0.f;
    for (k = 0; k < K; ++k) {
      const float a = A[(long)m * sam + (long)k * sak];
      const float *br = B + (long)k * sbk;
      if (sbn == 1) {
        for (n = 0; n < N; ++n) yr[n] += a * br[n];
      } else {
        for (n = 0; n < N; ++n) yr[n] += a * br[(long)n * sbn];
      }
    }
  }
}
"""

# The body every N-d pooling kernel shares (up to 3 spatial dims; unused dims have size 1):
# for each of NC planes and each output position, walk the window's taps inside [-pb, in + pe)
# (counted in ``padded``), run @TAP@ on those inside the input (it counts them in ``cnt``),
# then @STORE@. @XT@/@YT@ are the input/output C types, @ACC@ declares the accumulator.
POOL_BODY = r"""
{
  const long isz = (long)in[0] * in[1] * in[2], osz = (long)out[0] * out[1] * out[2];
  long nc;
  int o0, o1, o2, k0, k1, k2;
  for (nc = 0; nc < NC; ++nc) {
    const @XT@ *xc = x + nc * isz;
    @YT@ *yc = y + nc * osz;
    for (o0 = 0; o0 < out[0]; ++o0)
    for (o1 = 0; o1 < out[1]; ++o1)
    for (o2 = 0; o2 < out[2]; ++o2) {
      const int b0 = o0 * s[0] - pb[0], b1 = o1 * s[1] - pb[1], b2 = o2 * s[2] - pb[2];
      @ACC@
      int cnt = 0, padded = 0;
      for (k0 = 0; k0 < k[0]; ++k0) {
        const int i0 = b0 + k0 * d[0];
        if (i0 >= in[0] + pe[0]) break;
        for (k1 = 0; k1 < k[1]; ++k1) {
          const int i1 = b1 + k1 * d[1];
          if (i1 >= in[1] + pe[1]) break;
          for (k2 = 0; k2 < k[2]; ++k2) {
            const int i2 = b2 + k2 * d[2];
            if (i2 >= in[2] + pe[2]) break;
            ++padded;
            if (i0 < 0 || i1 < 0 || i2 < 0 || i0 >= in[0] || i1 >= in[1] || i2 >= in[2]) continue;
@TAP@
          }
        }
      }
@STORE@
    }
  }
}
"""


def pool_body(xt: str, yt: str, acc: str, tap: str, store: str) -> str:
    """:data:`POOL_BODY` with its placeholders filled (``tap`` and ``store`` are whole,
    indented lines)."""
    fill = {"@XT@": xt, "@YT@": yt, "@ACC@": acc, "@TAP@": tap, "@STORE@": store}
    code = POOL_BODY
    for key, value in fill.items():
        code = code.replace(key, value)
    return code


# kind 0: max, 1: average excluding pads, 2: average including pads (taps inside
# [-pb, in + pe) count). {T} is the element type, {ACC} the accumulator's.
_POOL_SIGNATURE = r"""
static void gp_pool_{T}(const {T} *x, {T} *y, long NC, const int *in, const int *out,
                        const int *k, const int *s, const int *d, const int *pb, const int *pe,
                        int kind)"""
POOL = _POOL_SIGNATURE + pool_body(
    "{T}",
    "{T}",
    "{ACC} acc = {INIT};",
    """            {
              const {T} v = xc[((long)i0 * in[1] + i1) * in[2] + i2];
              if (kind == 0) { if (v > acc || cnt == 0) acc = v; } else acc += v;
              ++cnt;
            }""",
    """      if (kind == 0) yc[((long)o0 * out[1] + o1) * out[2] + o2] = ({T})acc;
      else yc[((long)o0 * out[1] + o1) * out[2] + o2] =
          ({T})(acc / (kind == 2 ? padded : (cnt ? cnt : 1)));""",
)

# softmax over the middle axis of [outer][n][inner]
SOFTMAX = r"""
static void gp_softmax_f32(const float *x, float *y, long outer, long n, long inner)
{
  long o, i, j;
  for (o = 0; o < outer; ++o)
    for (j = 0; j < inner; ++j) {
      const float *xr = x + o * n * inner + j;
      float *yr = y + o * n * inner + j;
      float mx = xr[0], sum = 0.f;
      for (i = 1; i < n; ++i) mx = xr[i * inner] > mx ? xr[i * inner] : mx;
      for (i = 0; i < n; ++i) { const float e = expf(xr[i * inner] - mx); yr[i * inner] = e; sum += e; }
      for (i = 0; i < n; ++i) yr[i * inner] /= sum;
    }
}
"""
