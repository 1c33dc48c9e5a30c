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
from .csrc_conv_q8 import COL, DOT, DOTU, FC, KERNELS, KERNELS_U, POINTWISE
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
