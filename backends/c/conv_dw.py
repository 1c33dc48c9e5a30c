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

In place: a channel's plane is copied whole into scratch before any output of that channel is
written, and output channel ``c`` ends where input channel ``c + 1`` begins or before it (when
``OH * OW * sizeof(y) <= H * W * sizeof(x)``), so the output may overwrite an input that dies
at this node (:func:`may_overwrite`: stride and padding may differ), with the one-channel
scratch as the only extra memory (TinyEngine's in-place depthwise convolution).
"""

from __future__ import annotations

import re

import numpy as np

from . import csrc_float
from .conv_fast import NOUNROLL
from .csrc_int8 import SIMD, requant_row, saturation_caps
from .ctext import act_args
from .opbase import ConvGeometry

_TAG = {"int8_t": "s8", "uint8_t": "u8", "int16_t": "s16"}
OB = 16  # outputs of a row per chunk (two AVX2 registers of floats or int32) ...
OB_NARROW = 8  # ... or one, for rows of at most 8 outputs


def _ob(geo: ConvGeometry) -> int:
    return OB_NARROW if geo.OW <= OB_NARROW else OB


KERNEL = r"""
GP_NOINLINE static void gp_dw_@SFX@(const @XT@ *x, const @WT@ *w, const @BT@ *b, @YT@ *y,
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
            GP_NOUNROLL for (j = 0; j < @OB@; ++j) acc[j] += wv * (@AT@)xp[j];
          }
        @STORE@
      }
    }@CEND@
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


def _padded(geo: ConvGeometry) -> tuple[int, int]:
    """(rows, row length) of the padded, phase-split plane."""
    hp = (geo.OH - 1) * geo.sh + (geo.KH - 1) * geo.dh + 1
    wp = (geo.OW - 1) * geo.sw + (geo.KW - 1) * geo.dw + 1
    return hp, geo.sw * (-(-wp // geo.sw) + _ob(geo))


def scratch_bytes(geo: ConvGeometry, int8: bool = False) -> int:
    """The padded plane of one channel (float elements); for int8, then the channel's int32
    results."""
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
    else:
        tag = "".join(_TAG[q[k]] for k in ("xt", "wt", "yt"))
        sub = {"@XT@": q["xt"], "@WT@": q["wt"], "@AT@": "float", "@YT@": q["yt"]}
        sub.update({"@PT@": "float", "@SFX@": f"{tag}_{shape}", "@BT@": "int32_t", "@A0@": "0.f"})
        sub["@QP@"] = (
            "const uint32_t *ra, int zx, const int32_t *qm, const int32_t *qs, int zy, int qmin, "
            "int qmax"
        )
        xv = "(float)((int32_t){} - zx)"
        # the channel's int32 results go to the scratch after the plane, then are requantised
        # at once (one call per channel, not per chunk: small planes have short rows)
        row = "int32_t *ar = (int32_t *)(void *)(pad + HP * RS) + (long)oh * OW;"
        store = "for (j = 0; j < n; ++j) ar[o0 + j] = bias + (int32_t)acc[j];"
        cend = (
            f"\n    gp_requant_row_{_TAG[q['yt']]}((const int32_t *)(void *)(pad + HP * RS), "
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
    fn, src = source(geo, {k: e[k] for k in ("xt", "wt", "yt")})
    cg.helper("simd", SIMD)
    cg.helper(*requant_row(e["yt"]))
    cg.helper(fn, src)
    wsym = cg.weight(np.ascontiguousarray(e["w"]).reshape(-1), "qdw_w")
    ra = cg.weight(saturation_caps(e["qm"], e["qs"]), "requant_caps")
    return (
        f"  int n;\n  for (n = 0; n < {geo.N}; ++n)\n"
        f"    {fn}(x + (long)n * {geo.x_size}, {wsym}, {bias}, y + (long)n * {geo.y_size}, "
        f"{cg.scratch('float')}, {geo.C}, {geo.H}, {geo.W}, {geo.OH}, {geo.OW}, {geo.ph}, "
        f"{geo.pw}, {ra}, {q});"
    )
