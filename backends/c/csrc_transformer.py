"""C source of the helpers the transformer kernels share (emitted once, only when used).

Like :mod:`.csrc_float`: ``static``, plain pointers and sizes, no globals, every index in range.
"""

from __future__ import annotations

# Layer normalisation of ``rows`` rows of ``n`` values each, in two passes with double
# accumulators:  mu = sum(x) / n,  var = sum((x - mu)^2) / n,  r = 1 / sqrt(var + eps),
# y = (x - mu) * r * s + b.  ``ss``/``bs`` are the strides of scale and bias (1, or 0 for one
# value); ``b``, ``mean`` and ``inv`` may be null. y may alias x (each x[i] is read before
# y[i] is written).
LAYERNORM = r"""
static void gp_layernorm_f32(const float *x, const float *s, long ss, const float *b, long bs,
                             float *y, float *mean, float *inv, long rows, long n, float eps)
{
  long r, i;
  for (r = 0; r < rows; ++r) {
    const float *xr = x + r * n;
    float *yr = y + r * n;
    double mu = 0.0, var = 0.0, rs;
    for (i = 0; i < n; ++i) mu += xr[i];
    mu /= (double)n;
    for (i = 0; i < n; ++i) {
      const double d = (double)xr[i] - mu;
      var += d * d;
    }
    var /= (double)n;
    rs = 1.0 / sqrt(var + (double)eps);
    for (i = 0; i < n; ++i) {
      const float v = (float)(((double)xr[i] - mu) * rs) * s[i * ss];
      yr[i] = b ? v + b[i * bs] : v;
    }
    if (mean) mean[r] = (float)mu;
    if (inv) inv[r] = (float)rs;
  }
}
"""

# y[m][n] = sum_k (a[m][k] - za) * (b[k][n] - zb[n * zbs])   (int32; zb may be null).
# @TA@/@TB@: the C types of A and B, @TAG@ their short names. The caller bounds K so that no
# sum overflows (|terms| <= 255 * 255).
MATMUL_INTEGER = r"""
static void gp_mmi_@TAG@(const @TA@ *a, const @TB@ *b, int32_t *y, long M, long N, long K,
                        int32_t za, const @TB@ *zb, long zbs)
{
  long m, n, k;
  for (m = 0; m < M; ++m) {
    int32_t *yr = y + m * N;
    for (n = 0; n < N; ++n) yr[n] = 0;
    for (k = 0; k < K; ++k) {
      const int32_t av = (int32_t)a[m * K + k] - za;
      const @TB@ *br = b + k * N;
      if (!av) continue;
      if (zb) {
        for (n = 0; n < N; ++n) yr[n] += av * ((int32_t)br[n] - (int32_t)zb[n * zbs]);
      } else {
        for (n = 0; n < N; ++n) yr[n] += av * (int32_t)br[n];
      }
    }
  }
}
"""

# DynamicQuantizeLinear of n floats to uint8, as ONNX Runtime computes it:
#   lo = min(0, min x), hi = max(0, max x), s = (hi - lo) / 255 (1 when hi == lo),
#   z = rint(clamp(-lo / s, 0, 255)), q = clamp(rint(x / s) + z, 0, 255)
# with rint rounding half to even (the default rounding mode); NaN quantizes to 0.
DYNAMIC_QUANTIZE = r"""
static void gp_dynq_u8(const float *x, uint8_t *y, float *scale, uint8_t *zp, long n)
{
  float lo = 0.f, hi = 0.f, s, z;
  long i;
  for (i = 0; i < n; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
  s = hi == lo ? 1.f : (hi - lo) / 255.f;
  z = 0.f - lo / s;
  z = rintf(z < 0.f ? 0.f : (z > 255.f ? 255.f : z));
  for (i = 0; i < n; ++i) {
    const float q = rintf(x[i] / s) + z;
    y[i] = q >= 255.f ? (uint8_t)255 : (q >= 0.f ? (uint8_t)q : (uint8_t)0);
  }
  if (scale) *scale = s;
  if (zp) *zp = (uint8_t)z;
}
"""
