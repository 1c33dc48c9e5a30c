"""Float direct convolution with weights repacked at compile time, for constant weights.

Weights ``[M][C/G][KH][KW]`` are stored as ``[G][M/G/MB][C/G][KH][KW][MB]`` (output channels in
blocks of ``MB``, zero-padded), so one input value times ``MB`` consecutive weights updates
``MB`` output channels: the inner loop is a contiguous, vectorisable multiply-add and the
``PB x MB`` accumulators stay in registers. Output pixels (row-major, rows may be crossed) go in
blocks of ``PB`` (a short last block repeats its last pixel). A conv that pads first copies its
input, zero-padded, into scratch, so that no tap needs a border test.

What makes the inner loop fast (measured on AVX-512 with GCC 12, ``-O3 -march=native``):

- the kernel size and dilations are literals (one function per combination), so the taps
  unroll and every input load is a constant offset from a pointer;
- each pixel of a block has its own named pointer (``x0``..``x7``), not an array of offsets:
  an FMA with its broadcast operand then needs no address arithmetic (with ``base[p] + off``
  GCC spent two integer instructions per FMA; with an array of pointers it packs them into
  vector registers and spills the accumulators);
- ``fmaf`` where ``FP_FAST_FMAF`` says it is fast (``csrc_float.FMA``): in ISO C mode GCC
  does not contract ``a * b + c`` on its own;
- where AVX-512 is on, blocks of ``PB_WIDE`` pixels (enough independent FMA chains for two
  FMA units) and 512-bit vectors (``GP_WIDE``: GCC otherwise tunes most AVX-512 targets for
  256-bit ones); else ``PB`` (``PB x 16`` accumulators fill 12 of the 16 AVX2 registers). An
  image with fewer pixels than a block gets blocks of its size. The blocking only changes
  which pixels share a pass over the weights, not the order of any pixel's sum: the builds
  are bit-exact with each other.

Plain C99: the attributes and pragmas are behind ``#if``, with the plain code as fallback;
GCC is kept from fully unrolling the ``MB`` loop (which would stop it vectorising that loop)
with ``#pragma GCC unroll 1``.
"""

from __future__ import annotations

import numpy as np

from . import csrc_float
from .ctext import act_args
from .opbase import ConvGeometry

# Output pixels per block: PB x MB = 6 x 16 accumulators fill 12 of the 16 AVX2 registers;
# where AVX-512 is on (32 registers, and GCC told to prefer 512-bit vectors), PB_WIDE x 16 fill 8
# of them: enough independent FMA chains for two FMA units of latency 4.
PB, PB_WIDE = 6, 8

# GP_WIDE: GCC, which tunes most AVX-512 targets for 256-bit vectors, vectorises the 16-wide
# loops of the kernels so marked with 512-bit ones.
WIDE = r"""
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define GP_WIDE __attribute__((target("prefer-vector-width=512")))
#else
#define GP_WIDE
#endif
"""

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
   channels, for a @KH@ x @KW@ kernel with dilations @DH@ x @DW@ (literals: the taps unroll and
   each input load is a fixed offset from one of @PB@ row pointers); every tap of every pixel
   lies inside xs (padded when the conv pads) */
GP_WIDE static void gp_convp_blk_f32_@SFX@(const float *xs, const float *wb, const float *bias,
                                 float *y, const long *base, int np, int cg, long hws,
                                 int WS, long ohw, int mc, int act, float lo, float hi)
{
  float acc[@PB@][@MB@];
  int i, p, c, kh, kw;
  for (p = 0; p < @PB@; ++p)
    for (i = 0; i < @MB@; ++i) acc[p][i] = bias[i];
  @XDECL@
  for (c = 0; c < cg; ++c) {
    const float *wc = wb + (long)c * @KH@ * @KW@ * @MB@;
    for (kh = 0; kh < @KH@; ++kh) {
      const long ro = (long)c * hws + (long)kh * @DH@ * WS;
      for (kw = 0; kw < @KW@; ++kw) {
        const float *wt = wc + (kh * @KW@ + kw) * @MB@;
        @TAPS@
      }
    }
  }
  for (p = 0; p < np; ++p) gp_act_block_f32_@MB@(acc[p], act, lo, hi);
  for (i = 0; i < mc; ++i)
    for (p = 0; p < np; ++p) y[(long)i * ohw + p] = acc[p][i];
}
"""

DRIVER = r"""
/* weights packed [G][M/G/@MB@][C/G][KH][KW][@MB@]; xp: scratch for the padded input (C planes
   of HP x WP) when the conv pads, else unused */
GP_NOINLINE GP_WIDE static void gp_convp_f32_@SFX@(const float *x, const float *wp, const float *b, float *y,
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
      for (p0 = 0; p0 < ohw; p0 += GP_PB_@SFX@) {
        const int np = (int)(ohw - p0 < GP_PB_@SFX@ ? ohw - p0 : GP_PB_@SFX@);
        long base[GP_PB_@SFX@];
        for (p = 0; p < GP_PB_@SFX@; ++p) {  /* a short last block repeats its last pixel */
          const long q = p0 + (p < np ? p : np - 1);
          base[p] = (q / OW) * sh * WS + (q % OW) * sw;
        }
        gp_convp_blk_f32_@SFX@(xs + (long)g * cg * hws, wb, bias, y + (long)m0 * ohw + p0,
                               base, np, cg, hws, WS, ohw, mc, act, lo, hi);
      }
    }
}
"""


# 1x1 convolution with stride 1 and no padding: Y[M][P] = W[M][C] X[C][P], vectorised over
# pixels (x rows and y rows contiguous); weights packed [M/MR][C][MR].
MR, NR = 6, 16
POINTWISE = r"""
GP_NOINLINE GP_WIDE static void gp_pw_f32(const float *x, const float *wp, const float *b, float *y, int C, int M,
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
            GP_NOUNROLL for (j = 0; j < @NR@; ++j) acc[r][j] = GP_FMAF(wv, xr[j], acc[r][j]);
          }
        }
      } else {
        for (c = 0; c < C; ++c) {
          const float *xr = x + (long)c * P + p0;
          const float *wr = wb + (long)c * @MR@;
          for (r = 0; r < @MR@; ++r)
            for (j = 0; j < np; ++j) acc[r][j] = GP_FMAF(wr[r], xr[j], acc[r][j]);
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


def _block_source(mb: int, pb: int, sfx: str, geo: ConvGeometry) -> str:
    """The block function for ``pb`` pixels: one named input pointer per pixel (not an array
    of pointers, which GCC packs into vector registers, spilling the accumulators)."""
    xdecl = "const float " + ", ".join(f"*x{p} = xs + base[{p}]" for p in range(pb)) + ";"
    taps = "\n        ".join(
        f"{{ const float v = x{p}[ro + kw * @DW@]; GP_NOUNROLL for (i = 0; i < @MB@; ++i) "
        f"acc[{p}][i] = GP_FMAF(v, wt[i], acc[{p}][i]); }}"
        for p in range(pb)
    )
    src = KERNEL.replace("@XDECL@", xdecl).replace("@TAPS@", taps)
    sub = {"@SFX@": sfx, "@MB@": str(mb), "@PB@": str(pb), "@KH@": str(geo.KH)}
    sub.update({"@KW@": str(geo.KW), "@DH@": str(geo.dh), "@DW@": str(geo.dw)})
    for k, v in sub.items():
        src = src.replace(k, v)
    return src


def convp_source(mb: int, geo: ConvGeometry) -> tuple[str, str]:
    """(function name, C source) of the packed float convolution for blocks of ``mb``
    output channels and ``geo``'s kernel size and dilations (literals in the source): the
    block function for ``PB_WIDE`` pixels where AVX-512 is on, else for ``PB`` (for fewer
    when the image has fewer: a separate specialisation), then the driver (needs
    :data:`WIDE`)."""
    ohw = max(1, geo.OH * geo.OW)
    sfx = f"{mb}_{geo.KH}x{geo.KW}d{geo.dh}x{geo.dw}" + (f"_p{ohw}" if ohw < PB_WIDE else "")
    wide, narrow = min(PB_WIDE, ohw), min(PB, ohw)  # no block longer than the image
    src = (
        f"\n#if defined(__AVX512F__)\n#define GP_PB_{sfx} {wide}"
        + _block_source(mb, wide, sfx, geo)
        + f"#else\n#define GP_PB_{sfx} {narrow}"
        + _block_source(mb, narrow, sfx, geo)
        + "#endif"
        + DRIVER.replace("@SFX@", sfx).replace("@MB@", str(mb))
    )
    assert "@" not in src
    return f"gp_convp_f32_{sfx}", src


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
    cg.helper("fma", csrc_float.FMA)
    cg.helper("wide", WIDE)
    bias = cg.ptr(b.name) if b is not None else "0"
    if pointwise(geo):
        cg.helper("store_act", csrc_float.STORE_ACT)
        cg.helper("pw", POINTWISE.replace("@MR@", str(MR)).replace("@NR@", str(NR)))
        wsym = cg.weight(pack(w, 1, MR).reshape(-1), f"conv1x1_w_packed_{MR}")
        fn, args = "gp_pw_f32", f"{geo.C}, {geo.M}, {geo.H * geo.W}"
    else:
        mb = block_size(geo.M // geo.G)
        cg.helper(f"act_block_{mb}", csrc_float.ACT_BLOCK.replace("@N@", str(mb)))
        fn, src = convp_source(mb, geo)
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
