"""Depthwise convolution (one input and one output channel per group), float and int8.

Per channel the input plane is copied, zero-padded, into scratch with each row's columns split
by phase of the stride: padded column ``c`` goes to ``(c % SW) * WQ + c / SW``. Output pixel
``ow`` of tap ``(kh, kw)`` then reads padded row ``oh * SH + kh * DH`` at phase
``(kw * DW) % SW``, position ``ow + (kw * DW) / SW``: contiguous in ``ow`` for every stride,
so the inner loop, over a chunk of ``OB`` outputs of a row held in registers, vectorises with
no border test (``GP_NOUNROLL`` keeps GCC from unrolling it before it vectorises). Kernel
size, strides and dilations are literals in the emitted function (one per combination), so
the taps unroll. The padding of the plane is written once per call; each channel overwrites
only the inside.

float: ``y = act(b + sum_taps w * xpad)``, the activation applied to the whole chunk at once
(a fixed-count loop: branch-free). int8: the plane holds ``x - zx`` as float (0 in the
padding) and ``sum_taps w * xpad`` is summed in float, exactly (integers below 2^24:
``csrc_int8.f32_exact`` is checked before this kernel is chosen), at the float kernel's speed;
``b + (int32)sum`` for the whole channel goes to scratch after the plane and is requantised
at once by ``gp_requant_row``: the generic kernel's integers, so bit-exact with it.

int8, when every requantisation shift is on the double path (``31 + qs <= 42``): a chunk of
16 outputs is requantised where it is computed (``gp_rq1d``, the channel's ``qm * 2^-t``),
not through the int32 row; planes of at most ``PCL`` output pixels (mobilenet_v2's 4x4 and
2x2 stages: rows too short for the chunks) run ``gp_dw_cl`` instead: channels innermost, in
blocks of ``CL``: ``xs[HP][WP][CL]`` holds ``x - zx`` of the block as float, each output
pixel's ``CL`` sums are one vector (taps unrolled), requantised across the channels at once
into a ``[P][CL]`` tile, then transposed into the output's channel planes.

In place: a channel's plane (``gp_dw_cl``: a block's planes) is copied whole into scratch
before any output of that channel is written, and output channel ``c`` ends where input
channel ``c + 1`` begins or before it (when ``OH * OW * sizeof(y) <= H * W * sizeof(x)``), so
the output may overwrite an input that dies at this node (:func:`may_overwrite`: stride and
padding may differ), with the one-channel (one-block) scratch as the only extra memory
(TinyEngine's in-place depthwise convolution).
"""

from __future__ import annotations

import re

import numpy as np

from . import csrc_float
from .conv_fast import NOUNROLL, WIDE
from .csrc_int8 import SIMD, lane_tables, requant_lane, requant_row, saturation_caps
from .ctext import act_args
from .opbase import ConvGeometry

_TAG = {"int8_t": "s8", "uint8_t": "u8", "int16_t": "s16"}
OB = 16  # outputs of a row per chunk (two AVX2 registers of floats or int32) ...
OB_NARROW = 8  # ... or one, for rows of at most 8 outputs


def _ob(geo: ConvGeometry) -> int:
    return OB_NARROW if geo.OW <= OB_NARROW else OB


KERNEL = r"""
GP_NOINLINE @WIDE@static void gp_dw_@SFX@(const @XT@ *x, const @WT@ *w, const @BT@ *b, @YT@ *y,
                                    @PT@ *pad, int C, int H, int W, int OH, int OW, int ph,
                                    int pw, @QP@)
{
  const int HP = (OH - 1) * @SH@ + (@KH@ - 1) * @DH@ + 1;
  const int WP = (OW - 1) * @SW@ + (@KW@ - 1) * @DW@ + 1;
  const int WQ = (WP + @SW@ - 1) / @SW@ + @OB@;
  const long RS = (long)@SW@ * WQ;
  const int r0 = gp_imax(0, ph), r1 = gp_imin(HP, H + ph);
  const int c0 = gp_imax(0, pw), c1 = gp_imin(WP, W + pw);
  int c, r, f, q, oh, o0, kh, kw, j;
  long k;
  for (k = 0; k < HP * RS; ++k) pad[k] = 0;  /* stays 0 outside [r0, r1) x [c0, c1) */
  for (c = 0; c < C; ++c) {
    const @XT@ *xc = x + (long)c * H * W;
    const @WT@ *wc = w + (long)c * @KH@ * @KW@;
    const @BT@ bias = b ? b[c] : 0;
    @AT@ wl[@KH@ * @KW@];  /* a local copy keeps GCC from vectorising across taps */
    for (j = 0; j < @KH@ * @KW@; ++j) wl[j] = (@AT@)wc[j];
    for (r = r0; r < r1; ++r) {
      const long xb = (long)(r - ph) * W - pw;
      for (f = 0; f < @SW@; ++f) {
        @PT@ *pf = pad + (long)r * RS + (long)f * WQ;
        const int q1 = (c1 - f + @SW@ - 1) / @SW@;
        for (q = (c0 - f + @SW@ - 1) / @SW@; q < q1; ++q)
          pf[q] = @XV(xc[xb + (long)q * @SW@ + f])@;
      }
    }
    for (oh = 0; oh < OH; ++oh) {
      const @PT@ *pr = pad + (long)oh * @SH@ * RS;
      @ROW@
      for (o0 = 0; o0 < OW; o0 += @OB@) {
        const int n = gp_imin(@OB@, OW - o0);
        @AT@ acc[@OB@];
        for (j = 0; j < @OB@; ++j) acc[j] = @A0@;
        for (kh = 0; kh < @KH@; ++kh)
          for (kw = 0; kw < @KW@; ++kw) {
            const @AT@ wv = wl[kh * @KW@ + kw];
            const @PT@ *xp = pr + (long)kh * @DH@ * RS + ((kw * @DW@) % @SW@) * WQ
                             + (kw * @DW@) / @SW@ + o0;
            GP_NOUNROLL for (j = 0; j < @OB@; ++j) @MAC@;
          }
        @STORE@
      }
    }@CEND@
  }
}
"""


# int8, channels innermost (small planes): blocks of CL channels side by side
CL = 16
KERNEL_CL = r"""
/* depthwise @KH@x@KW@, strides @SH@x@SW@, dilations @DH@x@DW@, channels innermost: blocks of
   @CL@ channels; xs[HP][WP][@CL@] = x - zx as float (0 in the padding), each output pixel's
   @CL@ sums in one vector, requantised at once into the tile t[P][@CL@], then transposed out.
   w: [C / @CL@][@KH@ * @KW@][@CL@], zero past C */
GP_NOINLINE GP_WIDE static void gp_dw_cl_@SFX@(const @XT@ *x, const @WT@ *w, const int32_t *b,
                                    @YT@ *y, float *xs, int C, int H, int W, int OH, int OW,
                                    int ph, int pw, const uint32_t *ra, int zx,
                                    const int32_t *qm, const int32_t *qs, int zy, int qmin,
                                    int qmax)
{
  const int HP = (OH - 1) * @SH@ + (@KH@ - 1) * @DH@ + 1;
  const int WP = (OW - 1) * @SW@ + (@KW@ - 1) * @DW@ + 1;
  const long P = (long)OH * OW, HW = (long)H * W;
  const int r0 = gp_imax(0, ph), r1 = gp_imin(HP, H + ph);
  const int c0 = gp_imax(0, pw), c1 = gp_imin(WP, W + pw);
  @YT@ *t = (@YT@ *)(void *)(xs + (long)HP * WP * @CL@);
  int cb, j, r, col, oh, ow, kh, kw;
  long k, p;
  for (k = 0; k < (long)HP * WP * @CL@; ++k) xs[k] = 0.f;  /* the padding stays 0 */
  for (cb = 0; cb < C; cb += @CL@) {
    const int nc = gp_imin(@CL@, C - cb);
    float wl[@KH@ * @KW@][@CL@];
    double dm[@CL@];
    int32_t bl[@CL@], cap[@CL@];
    for (k = 0; k < @KH@ * @KW@; ++k)
      for (j = 0; j < @CL@; ++j) wl[k][j] = (float)w[((long)cb * @KH@ * @KW@) + k * @CL@ + j];
    for (j = 0; j < @CL@; ++j) {
      const int c = cb + (j < nc ? j : 0);
      union { uint64_t u; double d; } p2;  /* 2^-t */
      p2.u = (uint64_t)(1023 - 31 - qs[c]) << 52;
      dm[j] = (double)qm[c] * p2.d;
      cap[j] = ra[c] > 2147483647u ? 2147483647 : (int32_t)ra[c];
      bl[j] = b ? b[c] : 0;
    }
    for (j = 0; j < nc; ++j) {
      const @XT@ *xc = x + (long)(cb + j) * HW;
      for (r = r0; r < r1; ++r)
        for (col = c0; col < c1; ++col)
          xs[((long)r * WP + col) * @CL@ + j] = (float)((int32_t)xc[(long)(r - ph) * W + col - pw] - zx);
    }
    for (oh = 0; oh < OH; ++oh)
      for (ow = 0; ow < OW; ++ow) {
        const float *xp = xs + ((long)oh * @SH@ * WP + (long)ow * @SW@) * @CL@;
        @YT@ *tp = t + ((long)oh * OW + ow) * @CL@;
        float acc[@CL@];
        int32_t v[@CL@];
        for (j = 0; j < @CL@; ++j) acc[j] = 0.f;
        for (kh = 0; kh < @KH@; ++kh)
          for (kw = 0; kw < @KW@; ++kw) {
            const float *xq = xp + ((long)kh * @DH@ * WP + kw * @DW@) * @CL@;
            const float *wq = wl[kh * @KW@ + kw];
            GP_NOUNROLL for (j = 0; j < @CL@; ++j) acc[j] = GP_FMAF(wq[j], xq[j], acc[j]);
          }
        for (j = 0; j < @CL@; ++j) v[j] = gp_rq1d_@YTAG@(bl[j] + (int32_t)acc[j], dm[j], cap[j], zy, qmin, qmax);
        for (j = 0; j < @CL@; ++j) tp[j] = (@YT@)v[j];
      }
    for (j = 0; j < nc; ++j) {
      @YT@ *yc = y + (long)(cb + j) * P;
      for (p = 0; p < P; ++p) yc[p] = t[p * @CL@ + j];
    }
  }
}
"""


def applicable(geo: ConvGeometry) -> bool:
    """One input and one output channel per group."""
    return geo.depthwise


def may_overwrite(node, k: int, tensors) -> bool:
    """Whether the depthwise kernel chosen for ``node`` may write its output over input ``k``
    (see the module docstring): input 0, one output channel no longer than one input
    channel."""
    if k != 0 or node.extra.get("kernel") != "depthwise":
        return False
    geo: ConvGeometry = node.extra["geo"]
    x, y = tensors[node.inputs[0]], tensors[node.outputs[0]]
    return geo.OH * geo.OW * y.dtype.itemsize <= geo.H * geo.W * x.dtype.itemsize


PCL = 32  # an int8 depthwise conv of at most this many output pixels runs gp_dw_cl


def channels_last(geo: ConvGeometry, qs) -> bool:
    """Whether the int8 depthwise conv runs channels innermost (``gp_dw_cl``): a small plane
    (at most ``PCL`` output pixels) and every requantisation on the double path
    (``31 + qs <= 42``, :data:`.csrc_int8.REQUANT_ROW`)."""
    return geo.OH * geo.OW <= PCL and bool((np.asarray(qs) <= 11).all())


def _padded_cl(geo: ConvGeometry) -> tuple[int, int]:
    hp = (geo.OH - 1) * geo.sh + (geo.KH - 1) * geo.dh + 1
    wp = (geo.OW - 1) * geo.sw + (geo.KW - 1) * geo.dw + 1
    return hp, wp


def _padded(geo: ConvGeometry) -> tuple[int, int]:
    """(rows, row length) of the padded, phase-split plane."""
    hp = (geo.OH - 1) * geo.sh + (geo.KH - 1) * geo.dh + 1
    wp = (geo.OW - 1) * geo.sw + (geo.KW - 1) * geo.dw + 1
    return hp, geo.sw * (-(-wp // geo.sw) + _ob(geo))


def scratch_bytes(geo: ConvGeometry, int8: bool = False, qs=None) -> int:
    """The padded plane of one channel (float elements); for int8, then the channel's int32
    results; channels innermost (``qs`` given and :func:`channels_last`), the padded planes
    of ``CL`` channels (float) and the output tile (``CL`` bytes per pixel)."""
    if int8 and qs is not None and channels_last(geo, qs):
        hp, wp = _padded_cl(geo)
        return (hp * wp * 4 + geo.OH * geo.OW) * CL
    hp, rs = _padded(geo)
    return (hp * rs + (geo.OH * geo.OW if int8 else 0)) * 4


def source(geo: ConvGeometry, q: dict | None = None) -> tuple[str, str]:
    """(function name, C source) for ``geo``'s kernel size, strides and dilations. ``q`` None:
    float; else the int8 kernel for C types ``q["xt"]``, ``q["wt"]``, ``q["yt"]``."""
    shape = f"{geo.KH}x{geo.KW}s{geo.sh}x{geo.sw}d{geo.dh}x{geo.dw}" + (
        f"_{_ob(geo)}" if _ob(geo) != OB else ""
    )
    if q is None:
        sub = {"@XT@": "float", "@WT@": "float", "@AT@": "float", "@YT@": "float"}
        sub.update({"@PT@": "float", "@SFX@": f"f32_{shape}", "@BT@": "float", "@A0@": "bias"})
        sub["@QP@"] = "int act, float lo, float hi"
        xv = "{}"
        store = (
            "gp_act_block_f32_@OB@(acc, act, lo, hi);\n"
            "        memcpy(yr + o0, acc, (size_t)n * sizeof(float));"
        )
        row, cend = "float *yr = y + ((long)c * OH + oh) * OW;", ""
        sub["@MAC@"], sub["@WIDE@"] = "acc[j] += wv * xp[j]", ""
    else:
        tag = "".join(_TAG[q[k]] for k in ("xt", "wt", "yt"))
        sub = {"@XT@": q["xt"], "@WT@": q["wt"], "@AT@": "float", "@YT@": q["yt"]}
        sub.update({"@PT@": "float", "@SFX@": f"{tag}_{shape}", "@BT@": "int32_t", "@A0@": "0.f"})
        sub["@QP@"] = (
            "const uint32_t *ra, const double *dm, const int32_t *cap, int zx, const int32_t *qm, "
            "const int32_t *qs, int zy, int qmin, int qmax"
        )
        xv = "(float)((int32_t){} - zx)"
        # exact integers either way; 16 floats in one AVX-512 register
        sub["@MAC@"], sub["@WIDE@"] = "acc[j] = GP_FMAF(wv, xp[j], acc[j])", "GP_WIDE "
        # requantised chunk by chunk when every shift is on the double path (dm given: the
        # channel's multiplier and cap); else the channel's int32 results go to the scratch
        # after the plane, then are requantised at once by gp_requant_row
        yq = _TAG[q["yt"]]
        row = (
            "int32_t *ar = (int32_t *)(void *)(pad + HP * RS) + (long)oh * OW;\n"
            "      @YT@ *yr = y + ((long)c * OH + oh) * OW;"
        )
        store = (
            "if (dm) {\n          int32_t v[@OB@];\n"
            f"          for (j = 0; j < @OB@; ++j) v[j] = gp_rq1d_{yq}(bias + (int32_t)acc[j], "
            "dm[c], cap[c], zy, qmin, qmax);\n"
            "          for (j = 0; j < n; ++j) yr[o0 + j] = (@YT@)v[j];\n"
            "        } else {\n"
            "          for (j = 0; j < n; ++j) ar[o0 + j] = bias + (int32_t)acc[j];\n        }"
        )
        cend = (
            f"\n    if (!dm)\n      gp_requant_row_{yq}((const int32_t *)(void *)(pad + HP * RS), "
            "y + (long)c * OH * OW, (long)OH * OW, qm[c], qs[c], ra[c], zy, qmin, qmax);"
        )
    sub.update(
        {
            "@KH@": str(geo.KH),
            "@KW@": str(geo.KW),
            "@SH@": str(geo.sh),
            "@SW@": str(geo.sw),
            "@DH@": str(geo.dh),
            "@DW@": str(geo.dw),
            "@OB@": str(_ob(geo)),
        }
    )
    src = KERNEL.replace("@STORE@", store).replace("@ROW@", row).replace("@CEND@", cend)
    for k, v in sub.items():
        src = src.replace(k, v)
    src = re.sub(r"@XV\((.*?)\)@", lambda m: xv.format(m.group(1)), src)
    assert "@" not in src
    return f"gp_dw_{sub['@SFX@']}", src


def source_cl(geo: ConvGeometry, q: dict) -> tuple[str, str]:
    """(function name, C source) of the channels-innermost int8 kernel ``gp_dw_cl``."""
    tag = "".join(_TAG[q[k]] for k in ("xt", "wt", "yt"))
    sfx = f"{tag}_{geo.KH}x{geo.KW}s{geo.sh}x{geo.sw}d{geo.dh}x{geo.dw}"
    sub = {"@SFX@": sfx, "@XT@": q["xt"], "@WT@": q["wt"], "@YT@": q["yt"]}
    sub["@YTAG@"] = _TAG[q["yt"]]
    sub.update({"@KH@": geo.KH, "@KW@": geo.KW, "@SH@": geo.sh, "@SW@": geo.sw})
    sub.update({"@DH@": geo.dh, "@DW@": geo.dw, "@CL@": CL})
    src = KERNEL_CL
    for k, v in sub.items():
        src = src.replace(k, str(v))
    assert "@" not in src
    return f"gp_dw_cl_{sfx}", src


def pack_cl(w: np.ndarray) -> np.ndarray:
    """``[C][1][KH][KW]`` -> ``[C / CL][KH * KW][CL]``, zero past ``C``."""
    c, taps = w.shape[0], int(np.prod(w.shape[1:], dtype=np.int64))
    nb = -(-c // CL)
    out = np.zeros((nb * CL, taps), w.dtype)
    out[:c] = w.reshape(c, taps)
    return np.ascontiguousarray(out.reshape(nb, CL, taps).transpose(0, 2, 1))


def emit_float(cg, geo: ConvGeometry, w: np.ndarray, b: str, x: str, y: str, act) -> str:
    """C statements for a float depthwise conv (weights ``[C][1][KH][KW]``, bias pointer
    ``b`` or ``"0"``), once per image of the batch."""
    cg.helper("div", csrc_float.DIV)
    cg.helper("nounroll", NOUNROLL)
    cg.helper(f"act_block_{_ob(geo)}", csrc_float.ACT_BLOCK.replace("@N@", str(_ob(geo))))
    fn, src = source(geo)
    cg.helper(fn, src)
    wsym = cg.weight(np.ascontiguousarray(w, np.float32).reshape(-1), "dw_w")
    return (
        f"  const float *x = {x};\n  float *y = {y};\n  int n;\n"
        f"  for (n = 0; n < {geo.N}; ++n)\n"
        f"    {fn}(x + (long)n * {geo.x_size}, {wsym}, {b}, y + (long)n * {geo.y_size}, "
        f"{cg.scratch('float')}, {geo.C}, {geo.H}, {geo.W}, {geo.OH}, {geo.OW}, {geo.ph}, "
        f"{geo.pw}, {act_args(act)});"
    )


def emit_int8(cg, geo: ConvGeometry, e: dict, bias: str, q: str) -> str:
    """The call of the int8 depthwise kernel on ``x``/``y`` (declared by the caller) for
    each image; ``q`` is the requantisation argument list."""
    ra = cg.weight(saturation_caps(e["qm"], e["qs"]), "requant_caps")
    if channels_last(geo, e["qs"]):
        fn, src = source_cl(geo, {k: e[k] for k in ("xt", "wt", "yt")})
        cg.helper("wide", WIDE)
        cg.helper("fma", csrc_float.FMA)
        cg.helper(*requant_lane(e["yt"]))
        cg.helper(fn, src)
        wsym = cg.weight(pack_cl(e["w"]).reshape(-1), "qdw_w_packed_cl")
        return (
            f"  int n;\n  for (n = 0; n < {geo.N}; ++n)\n"
            f"    {fn}(x + (long)n * {geo.x_size}, {wsym}, {bias}, y + (long)n * {geo.y_size}, "
            f"{cg.scratch('float')}, {geo.C}, {geo.H}, {geo.W}, {geo.OH}, {geo.OW}, {geo.ph}, "
            f"{geo.pw}, {ra}, {q});"
        )
    fn, src = source(geo, {k: e[k] for k in ("xt", "wt", "yt")})
    # requantised chunk by chunk on the double path; rows of at most 8 outputs (one chunk)
    # are faster requantised a whole channel at once (measured)
    lanes = lane_tables(e["qm"], e["qs"]) if _ob(geo) == OB else None
    if lanes is not None:
        ra += f", {cg.weight(lanes[0], 'requant_dm')}, {cg.weight(lanes[1], 'requant_cap')}"
    else:
        ra += ", 0, 0"
    cg.helper("simd", SIMD)
    cg.helper("wide", WIDE)
    cg.helper("fma", csrc_float.FMA)
    cg.helper(*requant_row(e["yt"]))
    cg.helper(fn, src)
    wsym = cg.weight(np.ascontiguousarray(e["w"]).reshape(-1), "qdw_w")
    return (
        f"  int n;\n  for (n = 0; n < {geo.N}; ++n)\n"
        f"    {fn}(x + (long)n * {geo.x_size}, {wsym}, {bias}, y + (long)n * {geo.y_size}, "
        f"{cg.scratch('float')}, {geo.C}, {geo.H}, {geo.W}, {geo.OH}, {geo.OW}, {geo.ph}, "
        f"{geo.pw}, {ra}, {q});"
    )
