"""Sparse weight storage for conv and fully-connected kernels, and the kernels that skip zeros.

A layer's weights ``W[M][R]`` (``R`` = inputs per output: ``C/G·KH·KW`` for a conv, ``K`` for
a fully-connected layer) are stored as one stream of ``(gap, value)`` entries in row-major
order, Deep Compression's relative indexing (Han et al., ICLR 2016): entry ``i`` sits at flat
position ``p_i = p_{i-1} + gap_i + 1`` (``p_{-1} = -1``). A gap larger than the largest
``bits``-bit number is bridged by *filler* entries of value 0 that advance the position by
``2^bits``. Gaps are stored in 8 bits, or 4 bits packed two to a byte (low nibble first);
:func:`best` picks whichever of the two is smallest, and ``None`` when dense is smaller still.

Kernels walk the stream once per output row to find its entries, then for every output pixel
decode each entry's ``(channel, kh, kw)`` from its position within the row (divisions by the
compile-time constants ``KH·KW`` and ``KW``) and accumulate. Float kernels accumulate in
float in the same order as the entries; int8 kernels accumulate ``(x - zx)·w`` in int32 and
requantise exactly as the dense int8 kernels do, so their outputs equal the dense ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .csrc_int8 import output_args, output_stage
from .opbase import ConvGeometry

#: a layer is stored sparse only if at least this fraction of its weights are zero
MIN_ZERO_FRACTION = 0.5


@dataclass
class Encoded:
    values: np.ndarray  # one per entry (fillers are 0), the weights' dtype
    gaps: np.ndarray  # uint8: one per entry (bits=8) or two per byte (bits=4)
    bits: int
    entries: int

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.gaps.nbytes)


def encode(flat: np.ndarray, bits: int) -> Encoded:
    """The entry stream of ``flat`` (1-D) with ``bits``-bit gaps."""
    if bits not in (4, 8):
        raise ValueError(f"gap width must be 4 or 8 bits, got {bits}")
    limit = (1 << bits) - 1
    nz = np.flatnonzero(flat)
    gaps_list: list[int] = []
    vals_idx: list[int] = []  # index into flat, or -1 for a filler
    prev = -1
    for p in nz.tolist():
        gap = p - prev - 1
        while gap > limit:
            gaps_list.append(limit)
            vals_idx.append(-1)
            gap -= limit + 1
        gaps_list.append(gap)
        vals_idx.append(p)
        prev = p
    idx = np.asarray(vals_idx, dtype=np.int64)
    values = np.zeros(len(idx), dtype=flat.dtype)
    real = idx >= 0
    values[real] = flat[idx[real]]
    gaps = np.asarray(gaps_list, dtype=np.uint8)
    if bits == 4:
        padded = np.zeros(len(gaps) + (len(gaps) & 1), np.uint8)
        padded[: len(gaps)] = gaps
        gaps = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)
    return Encoded(values, gaps, bits, len(idx))


def decode(enc: Encoded, size: int) -> np.ndarray:
    """The dense 1-D array of ``size`` elements an encoding stands for (for tests)."""
    if enc.bits == 4:
        gaps = np.empty(len(enc.gaps) * 2, np.int64)
        gaps[0::2] = enc.gaps & 15
        gaps[1::2] = enc.gaps >> 4
        gaps = gaps[: enc.entries]
    else:
        gaps = enc.gaps.astype(np.int64)
    pos = np.cumsum(gaps + 1) - 1
    out = np.zeros(size, enc.values.dtype)
    if len(pos) and pos[-1] >= size:
        raise ValueError("the encoding runs past the end of the array")
    np.add.at(out, pos, enc.values)
    return out


def best(w: np.ndarray) -> Encoded | None:
    """The smallest sparse encoding of ``w`` (any shape, row-major), or ``None`` when ``w`` is
    not sparse enough or dense storage is at least as small."""
    flat = np.ascontiguousarray(w).reshape(-1)
    if flat.size == 0 or np.count_nonzero(flat) > (1 - MIN_ZERO_FRACTION) * flat.size:
        return None
    options = [encode(flat, 4), encode(flat, 8)]
    enc = min(options, key=lambda e: e.nbytes)
    return enc if enc.nbytes < flat.nbytes else None


# -- C sources ---------------------------------------------------------------------------------
_GAP = {
    8: "#define GP_GAP8(d, i) ((int)(d)[i])\n",
    4: "#define GP_GAP4(d, i) ((int)(((d)[(i) >> 1] >> (((i) & 1) << 2)) & 15))\n",
}

# Entries [e0, e1) of row m: positions below (m + 1) * R. Shared by every kernel below.
# Conv kernels work on tiles of GP_SP_TILE output pixels: each entry is decoded once per tile.
_ROW = r"""
#define GP_SP_TILE 32
#define GP_SP_ROW(GAP, d, nent, R, m, e, pos, e0, p0, e1)                               \
  do {                                                                                   \
    const long end_ = (long)((m) + 1) * (R);                                             \
    e0 = e; p0 = pos;                                                                    \
    while (e < (nent) && pos + GAP(d, e) + 1 < end_) { pos += GAP(d, e) + 1; ++e; }      \
    e1 = e;                                                                              \
  } while (0)
"""

SPCONV = r"""
static void gp_spconv_NAME(const XT *x, const WT *v, const uint8_t *d, long nent, const BT *b,
                           YT *y, int C, int H, int W, int M, int OH, int OW, int sh, int sw,
                           int dh, int dw, int ph, int pw, int G QARGS)
{
  const int cg = C / G, mg = M / G, R = cg * KH_ * KW_, P = OH * OW;
  long e = 0, pos = -1, e0, p0, e1, i;
  int m, t, j;
  for (m = 0; m < M; ++m) {
    const XT *xg = x + (long)(m / mg) * cg * H * W;
    GP_SP_ROW(GAP, d, nent, R, m, e, pos, e0, p0, e1);
    for (t = 0; t < P; t += GP_SP_TILE) {
      const int nt = P - t < GP_SP_TILE ? P - t : GP_SP_TILE;
      int ih0[GP_SP_TILE], iw0[GP_SP_TILE];
      AT acc[GP_SP_TILE];
      long p = p0 - (long)m * R;
      for (j = 0; j < nt; ++j) {
        ih0[j] = ((t + j) / OW) * sh - ph;
        iw0[j] = ((t + j) % OW) * sw - pw;
        acc[j] = b ? (AT)b[m] : (AT)0;
      }
      for (i = e0; i < e1; ++i) {
        p += GAP(d, i) + 1;
        {
          const int c = (int)(p / (KH_ * KW_)), r = (int)(p % (KH_ * KW_));
          const int dy = (r / KW_) * dh, dx = (r % KW_) * dw;
          const XT *xc = xg + (long)c * H * W;
          const AT wv = (AT)v[i];
          for (j = 0; j < nt; ++j) {
            const int ih = ih0[j] + dy, iw = iw0[j] + dx;
            if ((unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W)
              acc[j] += XV(xc[(long)ih * W + iw]) * wv;
          }
        }
      }
      for (j = 0; j < nt; ++j) y[(long)m * P + t + j] = OUT(acc[j], m);
    }
  }
}
"""

SPFC = r"""
static void gp_spfc_NAME(const XT *x, const WT *v, const uint8_t *d, long nent, const BT *b,
                         YT *y, int rows, int N, int K QARGS)
{
  int r, n;
  for (r = 0; r < rows; ++r) {
    const XT *xr = x + (long)r * K;
    long e = 0, pos = -1, e0, p0, e1, i;
    for (n = 0; n < N; ++n) {
      AT acc = b ? (AT)b[n] : (AT)0;
      long p;
      GP_SP_ROW(GAP, d, nent, K, n, e, pos, e0, p0, e1);
      p = p0 - (long)n * K;
      for (i = e0; i < e1; ++i) {
        p += GAP(d, i) + 1;
        acc += XV(xr[p]) * (AT)v[i];
      }
      y[(long)r * N + n] = OUT(acc, n);
    }
  }
}
"""

_FLOAT = {"XT": "float", "WT": "float", "YT": "float", "BT": "float", "AT": "float", "QARGS": ""}


def _render(
    template: str, name: str, types: tuple[str, str, str] | None, bits: int, kh=None, kw=None
) -> str:
    """Specialise a kernel template: types, gap width, kernel size, and how an input value is
    read (``XV``) and an accumulator written (``OUT``): as is for float; minus the input zero
    point, then requantised (int8/uint8 output) or scaled to float (an int8 layer with float
    output), by :func:`.csrc_int8.output_stage`, for int8."""
    code = template.replace("NAME", name).replace("GAP(", f"GP_GAP{bits}(")
    code = code.replace("GP_SP_ROW(GAP,", f"GP_SP_ROW(GP_GAP{bits},")
    if kh is not None:
        code = code.replace("KH_", str(kh)).replace("KW_", str(kw))
    if types is None:
        subst = _FLOAT
        code = re.sub(r"XV\(([^;]*?\])\)", r"\1", code)
        code = re.sub(r"OUT\(([^,]+), (\w+)\)", r"\1", code)
    else:
        xt, wt, yt = types
        qargs = ",\n  " + output_args(yt)
        subst = {"XT": xt, "WT": wt, "YT": yt, "BT": "int32_t", "AT": "int32_t", "QARGS": qargs}
        code = re.sub(r"XV\(([^;]*?\])\)", r"((int32_t)\1 - zx)", code)
        code = output_stage(code.replace(" QARGS", qargs), yt)
    code = code.replace(" QARGS", subst["QARGS"])
    for k in ("XT", "WT", "YT", "BT", "AT"):
        code = code.replace(k, subst[k])
    return code


def helpers(bits: int) -> dict[str, str]:
    """``{key: code}`` the sparse kernels need (gap macro, row walker)."""
    return {f"sp_gap{bits}": _GAP[bits], "sp_row": _ROW}


def conv_source(enc: Encoded, kh: int, kw: int, types: tuple[str, str, str] | None = None):
    """``(function name, code)`` of a sparse conv for this kernel size and gap width; float
    when ``types`` is None, else int8 with ``(x, w, y)`` C types."""
    if types is None:
        name = f"f32_k{kh}x{kw}_g{enc.bits}"
        return f"gp_spconv_{name}", _render(SPCONV, name, None, enc.bits, kh, kw)
    tag = "_".join(t.replace("_t", "") for t in types)
    name = f"{tag}_k{kh}x{kw}_g{enc.bits}"
    return f"gp_spconv_{name}", _render(SPCONV, name, types, enc.bits, kh, kw)


def fc_source(enc: Encoded, types: tuple[str, str, str] | None = None):
    """``(function name, code)`` of a sparse fully-connected layer ``y = x·Wᵀ (+ b)``."""
    if types is None:
        name = f"f32_g{enc.bits}"
        return f"gp_spfc_{name}", _render(SPFC, name, None, enc.bits)
    tag = "_".join(t.replace("_t", "") for t in types)
    name = f"{tag}_g{enc.bits}"
    return f"gp_spfc_{name}", _render(SPFC, name, types, enc.bits)


# -- emission ----------------------------------------------------------------------------------
def _stream(cg, node_name: str, w: np.ndarray, source) -> tuple[str, str] | None:
    """When ``w`` is best stored sparse: emit its entry stream, the helpers and the kernel
    ``source(enc)`` returns, and record the layer for the report; ``(kernel name, "values,
    gaps, entries" arguments)``. ``None`` when dense is smaller or sparse storage is off."""
    if not getattr(cg, "sparse", True):
        return None
    enc = best(w)
    if enc is None:
        return None
    for key, code in helpers(enc.bits).items():
        cg.helper(key, code)
    layers = getattr(cg, "sparse_layers", None)
    if layers is not None:
        layers.append(
            {
                "node": node_name,
                "weights": int(w.size),
                "nonzero": int(np.count_nonzero(w)),
                "gap_bits": enc.bits,
                "bytes": enc.nbytes,
                "dense_bytes": int(w.nbytes),
            }
        )
    fn, code = source(enc)
    cg.helper(fn, code)
    vals = cg.weight(enc.values, "sparse_values")
    gaps = cg.weight(enc.gaps, f"sparse_gaps{enc.bits}")
    return fn, f"{vals}, {gaps}, {enc.entries}L"


def emit_conv(
    cg,
    node,
    geo: ConvGeometry,
    w: np.ndarray,
    x: str,
    y: str,
    b: str,
    q: str = "",
    types: tuple[str, str, str] | None = None,
) -> str | None:
    """C statements for a conv whose constant weights ``w`` are stored sparse, or ``None``
    when dense storage is smaller. ``q`` carries the int8 requantisation arguments."""
    stream = _stream(cg, node.name, w, lambda enc: conv_source(enc, geo.KH, geo.KW, types))
    if stream is None:
        return None
    fn, data = stream
    args = geo.args(skip=("KH", "KW")) + (f", {q}" if q else "")
    return (
        f"  int n;\n  for (n = 0; n < {geo.N}; ++n)\n"
        f"    {fn}({x} + (long)n * {geo.x_size}, {data}, {b}, "
        f"{y} + (long)n * {geo.y_size}, {args});"
    )


def emit_fc(
    cg,
    node,
    w: np.ndarray,
    rows: int,
    x: str,
    y: str,
    b: str,
    q: str = "",
    types: tuple[str, str, str] | None = None,
) -> str | None:
    """C statements for ``y[rows][N] = x[rows][K]·Wᵀ (+ b)`` with ``w`` of shape ``[N][K]``
    stored sparse, or ``None`` when dense storage is smaller."""
    stream = _stream(cg, node.name, w, lambda enc: fc_source(enc, types))
    if stream is None:
        return None
    fn, data = stream
    n_out, k = w.shape
    tail = f", {q}" if q else ""
    return f"  {fn}({x}, {data}, {b}, {y}, {rows}, {n_out}, {k}{tail});"
