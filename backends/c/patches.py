"""Patch-based execution of a network's first stages (MCUNetV2, Lin et al., NeurIPS 2021).

The first nodes of a CNN hold the largest activations. Cut the schedule after node ``i`` (the
*cut*; its output ``T`` is the *cut tensor*) and split ``T``'s rows and columns into an
``N x N`` grid of *patches*. For each patch, in turn, the nodes up to the cut compute only the
part of every tensor that patch needs (its receptive field, rows and columns clipped to the
image), and the patch is copied into ``T``: the early tensors never exist in full, only one
patch's tiles at a time plus ``T``. Neighbouring patches overlap (the halo), so the early
layers compute some pixels more than once: the *recompute overhead*.

The transformation is a rewrite of the :class:`~.ir.Program`, before planning, so that the
planner, the code generator and the kernels see ordinary nodes:

- a tile ``X@pK`` (patch ``K`` of tensor ``X``) is an ordinary tensor of shape ``[n, c, h, w]``;
- a window node (a conv, float or int8) becomes one clone per patch whose geometry
  (``ConvGeometry``) is the tile's: input ``H' x W'``, output ``OH' x OW'`` and begin pads
  ``ph', pw'`` that are the image's own where the tile touches the image border and 0 inside,
  so every output pixel sums the same taps, in the same order, as the whole-image kernel:
  the output is bit-exact with the unpatched C (float and int8);
- an element-wise node becomes one clone per patch on same-shaped tiles;
- ``PatchCopy`` copies a window of a 4-d tensor into another: the graph input's window into
  the first tile, a tile's sub-window when a reader needs less of it than another reader (a
  residual ``Add`` needs less than the conv branch beside it), and the last tile into ``T``.
  Writing patch ``K`` into ``T`` reads ``T`` as left by patch ``K - 1`` (input 1) and writes
  over it (``Op.inplace``), so ``T`` is one buffer filled patch by patch.

Which nodes may be patched: convolutions (``Conv``, ``QConv_i8``) and element-wise ops
(:data:`ELEMENTWISE`) over 4-d tensors, whose other inputs are constants that do not vary
along rows and columns. A cut is valid when the nodes up to it are such nodes, all ancestors
of ``T``, and nothing after the cut reads any of their tensors but ``T``
(:func:`cut_points`). :func:`choose` plans every valid cut and keeps the one with the smallest
arena (then the least recompute), or, given a RAM budget, the one that meets it with the
least recompute, trying 2 x 2 patches, then 3 x 3, and so on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.errors import BackendError

from . import planner
from .ir import Node, Program, Tensor
from .opbase import ConvGeometry, Op

WINDOW = {"Conv", "QConv_i8"}
ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "Clip",
    "BatchNormalization",
    "QAdd_i8",
    "QRequant_i8",
    "QuantizeLinear",
    "DequantizeLinear",
}
MAX_PATCHES = 8  # the largest grid a RAM budget makes :func:`choose` try


@dataclass(frozen=True)
class Box:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of a tensor's image."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def h(self) -> int:
        return self.r1 - self.r0

    @property
    def w(self) -> int:
        return self.c1 - self.c0

    def union(self, o: Box | None) -> Box:
        if o is None:
            return self
        return Box(min(self.r0, o.r0), max(self.r1, o.r1), min(self.c0, o.c0), max(self.c1, o.c1))


class PatchCopy(Op):
    """``dst[:, :, dr + i, dc + j] = src[:, :, sr + i, sc + j]`` for a ``h x w`` window of
    4-d tensors (``node.extra["copy"] = (sr, sc, dr, dc, h, w)``). With a second input, the
    output is that input with the window written over it (in place)."""

    inplace = (1,)

    def emit(self, node, cg):
        src, dst = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        sr, sc, dr, dc, h, w = node.extra["copy"]
        n, c, sh, sw = src.shape
        _, _, dh, dw = dst.shape
        if len(node.inputs) > 1 and cg.ptr(node.inputs[1]) != cg.ptr(node.outputs[0]):
            raise AssertionError(f"{node.describe()}: the patch was not planned in place")
        return (
            f"  const {src.ctype} *s = {cg.ptr(src.name)};\n  {dst.ctype} *d = {cg.ptr(dst.name)};\n"
            f"  long p, r;\n  for (p = 0; p < {n * c}; ++p)\n    for (r = 0; r < {h}; ++r)\n"
            f"      memcpy(d + (p * {dh} + {dr} + r) * {dw} + {dc}, "
            f"s + (p * {sh} + {sr} + r) * {sw} + {sc}, {w * src.dtype.itemsize});"
        )


PATCH_OPS: dict[str, Op] = {"PatchCopy": PatchCopy()}


@dataclass
class Patched:
    """A patched program and what the report says about it."""

    prog: Program
    n: int
    cut: int  # index of the cut node in the unpatched schedule
    tensor: str
    info: dict[str, Any]


# -- which cuts are valid ---------------------------------------------------------------------
def _spatial_free(t: Tensor) -> bool:
    """A constant that broadcasts along rows and columns unchanged (its last two dims are 1
    once right-aligned with a 4-d tensor)."""
    return all(d == 1 for d in t.shape[-2:])


def _node_ok(node: Node, prog: Program, inside: set[str]) -> str | None:
    """Why ``node`` cannot be patched (None: it can). ``inside``: tensors of the stage so far
    (graph inputs and earlier stage outputs)."""
    if node.op not in WINDOW and node.op not in ELEMENTWISE:
        return f"{node.describe()} is not a convolution or an element-wise op"
    outs = [o for o in node.outputs if o]
    if len(outs) != 1 or len(prog.t(outs[0]).shape) != 4:
        return f"{node.describe()} does not have one 4-d output"
    y = prog.t(outs[0])
    for k, i in enumerate(node.inputs):
        if not i:
            continue
        t = prog.t(i)
        if t.is_const:
            if node.op in ELEMENTWISE and node.op != "BatchNormalization" and not _spatial_free(t):
                return f"{node.describe()} reads constant {i!r}, which varies along the image"
            continue
        if i not in inside:
            return f"{node.describe()} reads {i!r} from outside the stage"
        if len(t.shape) != 4 or (node.op in WINDOW and k > 0):
            return f"{node.describe()} reads {i!r}, which is not a 4-d image"
        if node.op in ELEMENTWISE and t.shape != y.shape:
            return f"{node.describe()} broadcasts {i!r}"
    if node.op in WINDOW:
        geo = node.extra.get("geo")
        if geo is None or len(prog.t(node.inputs[0]).shape) != 4:
            return f"{node.describe()} is not a 2-d convolution"
    if node.op in ("QuantizeLinear", "DequantizeLinear"):
        s, z = node.extra["s"], node.extra["z"]
        if (s.size > 1 or z.size > 1) and node.extra["axis"] != 1:
            return f"{node.describe()} has parameters along axis {node.extra['axis']}"
    if node.op == "Clip" and any(isinstance(node.extra.get(k), tuple) for k in ("lo", "hi")):
        return f"{node.describe()} has bounds known only at run time"
    return None


def cut_points(prog: Program) -> tuple[list[int], str]:
    """The steps after which the schedule may be cut, and why it cannot be cut further (the
    first node that cannot be patched)."""
    inside = {i for i in prog.inputs if len(prog.t(i).shape) == 4}
    last_read: dict[str, int] = {}
    for step, node in enumerate(prog.nodes):
        for i in node.inputs:
            if i:
                last_read[i] = step
    produced: list[str] = []
    cuts: list[int] = []
    why = "the model has no node"
    for step, node in enumerate(prog.nodes):
        reason = _node_ok(node, prog, inside)
        if reason is not None:
            why = reason
            break
        out = next(o for o in node.outputs if o)
        inside.add(out)
        produced.append(out)
        t = prog.t(out)
        # everything the stage produced but T dies inside it; T is not a graph output, has
        # rows and columns to split, and every stage node is one of its ancestors
        if (
            out not in prog.outputs
            and t.shape[2] * t.shape[3] > 1
            and all(last_read.get(p, -1) <= step for p in produced[:-1])
            and all(p not in prog.outputs for p in produced)
            and _all_ancestors(prog.nodes[: step + 1], out)
        ):
            cuts.append(step)
    else:
        why = "every node can be patched"
    return cuts, why


def _all_ancestors(nodes: list[Node], out: str) -> bool:
    need = {out}
    for node in reversed(nodes):
        if not any(o in need for o in node.outputs if o):
            return False
        need.update(i for i in node.inputs if i)
    return True


# -- receptive fields -------------------------------------------------------------------------
def _conv_in(geo: ConvGeometry, b: Box) -> Box:
    """The input rows and columns (clipped to the image) output box ``b`` reads."""
    r0 = b.r0 * geo.sh - geo.ph
    r1 = (b.r1 - 1) * geo.sh - geo.ph + (geo.KH - 1) * geo.dh + 1
    c0 = b.c0 * geo.sw - geo.pw
    c1 = (b.c1 - 1) * geo.sw - geo.pw + (geo.KW - 1) * geo.dw + 1
    return Box(max(0, r0), min(geo.H, r1), max(0, c0), min(geo.W, c1))


def _bounds(size: int, n: int) -> list[int]:
    return [size * k // n for k in range(n + 1)]


def grid(shape: tuple[int, ...], n: int) -> list[Box]:
    """The ``n x n`` patches of a 4-d tensor, row-major (sizes differ by at most one)."""
    rb, cb = _bounds(shape[2], n), _bounds(shape[3], n)
    return [Box(rb[i], rb[i + 1], cb[j], cb[j + 1]) for i in range(n) for j in range(n)]


def _fields(stage: list[Node], prog: Program, box: Box, cut_tensor: str):
    """(box of every stage tensor, box each node reads of each input) for one patch."""
    need: dict[str, Box] = {cut_tensor: box}
    wants: dict[int, dict[int, Box]] = {}
    for idx in range(len(stage) - 1, -1, -1):
        node = stage[idx]
        out = need[next(o for o in node.outputs if o)]
        want: dict[int, Box] = {}
        for k, i in enumerate(node.inputs):
            if not i or prog.t(i).is_const:
                continue
            want[k] = _conv_in(node.extra["geo"], out) if node.op in WINDOW else out
            need[i] = want[k].union(need.get(i))
        wants[idx] = want
    return need, wants


# -- the rewrite ------------------------------------------------------------------------------
def _macs(node: Node) -> int:
    geo = node.extra.get("geo")
    if geo is None:
        return 0
    return geo.N * geo.M * geo.OH * geo.OW * (geo.C // geo.G) * geo.KH * geo.KW


def model_macs(prog: Program) -> int:
    """Multiply-accumulates of the convolutions and fully-connected layers."""
    total = 0
    for node in prog.nodes:
        if node.extra.get("geo") is not None:
            total += _macs(node)
        elif node.op == "QFc_i8":
            total += int(np.prod(node.extra["w"].shape)) * int(node.extra["rows"])
        elif node.op in ("Gemm", "MatMul") and len(node.inputs) > 1:
            a, y = prog.t(node.inputs[0]), prog.t(node.outputs[0])
            total += y.size * (a.shape[-1] if a.shape else 1)
    return total


def rewrite(prog: Program, ops: dict, cut: int, n: int, sparse: bool = True) -> Patched:
    """``prog`` with nodes ``0..cut`` (already prepared: ``Op.prepare``) run on an ``n x n``
    grid of patches of the cut tensor. ``prog`` is not changed."""
    stage = prog.nodes[: cut + 1]
    cut_tensor = next(o for o in stage[-1].outputs if o)
    tshape = prog.t(cut_tensor).shape
    if n < 1 or n > min(tshape[2], tshape[3]):
        raise BackendError(
            f"patches={n}: the cut tensor {cut_tensor!r} of shape {list(tshape)} cannot be "
            f"split into {n} x {n} patches"
        )
    tensors = dict(prog.tensors)
    nodes: list[Node] = []
    stage_macs = sum(_macs(nd) for nd in stage)
    patched_macs = 0
    tiles_peak = 0
    boxes = grid(tshape, n)
    prev_full = ""
    for k, box in enumerate(boxes):
        need, wants = _fields(stage, prog, box, cut_tensor)
        tile: dict[str, str] = {}

        def new(name: str, like: str, b: Box) -> str:
            t = prog.t(like)
            tensors[name] = Tensor(name, (t.shape[0], t.shape[1], b.h, b.w), t.dtype)
            return name

        for x in prog.inputs:  # the graph input's window
            if x in need:
                b = need[x]
                tile[x] = new(f"{x}@p{k}", x, b)
                nodes.append(_copy(f"{x}@p{k}", x, tile[x], (b.r0, b.c0, 0, 0, b.h, b.w)))
        for idx, node in enumerate(stage):
            ins = list(node.inputs)
            for j, want in wants[idx].items():
                src, have = node.inputs[j], need[node.inputs[j]]
                if want == have:
                    ins[j] = tile[src]
                    continue
                crop = new(f"{src}@p{k}>{node.name}", src, want)
                copy = (want.r0 - have.r0, want.c0 - have.c0, 0, 0, want.h, want.w)
                nodes.append(_copy(crop, tile[src], crop, copy))
                ins[j] = crop
            out = next(o for o in node.outputs if o)
            tile[out] = new(f"{out}@p{k}", out, need[out])
            extra = {key: v for key, v in node.extra.items() if key not in ("kernel", "scratch")}
            extra["patch_of"] = node.name
            if node.op in WINDOW:
                extra["geo"] = _tile_geo(node.extra["geo"], wants[idx][0], need[out])
            clone = Node(
                node.op,
                f"{node.name}@p{k}",
                ins,
                [tile[out] if o == out else "" for o in node.outputs],
                node.attrs,
                node.opset,
                extra,
            )
            ops[node.op].prepare(clone, tensors, sparse)
            patched_macs += _macs(clone)
            nodes.append(clone)
        tiles_peak = max(tiles_peak, sum(tensors[v].nbytes for v in tile.values()))
        full = cut_tensor if k == len(boxes) - 1 else f"{cut_tensor}@full{k}"
        tensors[full] = dataclasses.replace(prog.t(cut_tensor), name=full)
        copy = (0, 0, box.r0, box.c0, box.h, box.w)
        nodes.append(
            _copy(f"{cut_tensor}@store{k}", tile[cut_tensor], full, copy, prev_full or None)
        )
        prev_full = full
    nodes += prog.nodes[cut + 1 :]
    new_prog = dataclasses.replace(prog, nodes=nodes, tensors=tensors)
    total = model_macs(prog)
    extra_macs = patched_macs - stage_macs
    info = {
        "grid": [n, n],
        "cut_node": stage[-1].name,
        "cut_tensor": cut_tensor,
        "cut_shape": list(tshape),
        "cut_step": cut,
        "stage_nodes": len(stage),
        "patch_rows": sorted({b.h for b in boxes}),
        "patch_cols": sorted({b.w for b in boxes}),
        "macs": total,
        "stage_macs": stage_macs,
        "extra_macs": extra_macs,
        "recompute_pct": round(100.0 * extra_macs / total, 2) if total else 0.0,
        "stage_recompute_pct": round(100.0 * extra_macs / stage_macs, 2) if stage_macs else 0.0,
    }
    return Patched(new_prog, n, cut, cut_tensor, info)


def _copy(name: str, src: str, dst: str, copy, base: str | None = None) -> Node:
    ins = [src] + ([base] if base else [])
    return Node("PatchCopy", name, ins, [dst], {}, 0, {"copy": copy})


def _tile_geo(geo: ConvGeometry, xin: Box, yout: Box) -> ConvGeometry:
    """The conv over input tile ``xin`` computing output box ``yout``: the begin pads are
    what remains of the image's pads at the tile's first row and column (0 inside)."""
    ph = xin.r0 - (yout.r0 * geo.sh - geo.ph)
    pw = xin.c0 - (yout.c0 * geo.sw - geo.pw)
    assert 0 <= ph <= geo.ph and 0 <= pw <= geo.pw, (geo, xin, yout)
    return dataclasses.replace(geo, H=xin.h, W=xin.w, OH=yout.h, OW=yout.w, ph=ph, pw=pw)


# -- choosing the cut and the grid ------------------------------------------------------------
def _arena(p: Patched, ops: dict) -> int:
    return planner.plan(p.prog, ops).arena_bytes


def choose(
    prog: Program,
    ops: dict,
    patches: int | None,
    ram_budget: int | None,
    sparse: bool = True,
) -> tuple[Patched | None, int]:
    """The patched program for ``patches`` (a grid, cut chosen here) and/or ``ram_budget``
    (bytes of arena; grid and cut chosen here), and the unpatched arena. None when the
    unpatched program already meets the budget (and no grid was asked for). Raises
    :class:`~graphopt.errors.BackendError` naming the option that cannot be met."""
    ops = {**ops, **PATCH_OPS}
    plain = planner.plan(prog, ops)
    base = plain.arena_bytes
    if patches is not None and (not isinstance(patches, int) or patches < 1):
        raise BackendError(f"patches={patches!r}: give a grid size of at least 1")
    if ram_budget is not None and (not isinstance(ram_budget, int) or ram_budget < 1):
        raise BackendError(f"ram_budget={ram_budget!r}: give a positive number of bytes")
    if patches == 1 and ram_budget is not None and base > ram_budget:
        raise BackendError(
            f"ram_budget={ram_budget}: cannot be met with patches=1 (no patches): the arena "
            f"is {base} bytes"
        )
    if patches == 1 or (patches is None and (ram_budget is None or base <= ram_budget)):
        return None, base
    cuts, why = cut_points(prog)
    if not cuts:
        opt = f"patches={patches}" if patches is not None else f"ram_budget={ram_budget}"
        raise BackendError(
            f"{opt}: the model has no cut point for patch-based execution (the first stages "
            f"must be convolutions and element-wise ops over images; {why})"
        )
    # the steps after a cut keep their buffers (the stage's tensors die inside it): the
    # largest live sum after the cut bounds the patched arena from below
    end = len(prog.nodes)
    live = [sum(b.nbytes for b in plain.buffers if b.first <= s <= b.last) for s in range(end)]
    tail = [max(live[s + 1 :], default=0) for s in range(end)]
    grids = [patches] if patches is not None else list(range(2, MAX_PATCHES + 1))
    best: tuple | None = None  # (key, Patched, arena)
    smallest: tuple[int, str] | None = None
    for n in grids:
        for cut in cuts:
            shape = prog.t(next(o for o in prog.nodes[cut].outputs if o)).shape
            if min(shape[2], shape[3]) < n:
                continue
            bound = ram_budget if ram_budget is not None else (best[2] if best else None)
            if bound is not None and tail[cut] > bound:
                if smallest is None or tail[cut] < smallest[0]:
                    name = prog.nodes[cut].name
                    smallest = (tail[cut], f"what follows a cut after {name!r} alone")
                continue
            p = rewrite(prog, ops, cut, n, sparse)
            arena = _arena(p, ops)
            if smallest is None or arena < smallest[0]:
                smallest = (arena, f"{n} x {n} patches cut after {prog.nodes[cut].name!r}")
            if ram_budget is not None:
                if arena > ram_budget:
                    continue
                key = (p.info["extra_macs"], arena)
            else:
                key = (arena, p.info["extra_macs"])
            if best is None or key < best[0]:
                best = (key, p, arena)
        if best is not None and ram_budget is not None:
            break  # the smallest grid that meets the budget
    if best is None:
        if smallest is None:
            raise BackendError(
                f"patches={patches}: no cut point's tensor has {patches} rows and columns to split"
            )
        opt = f"ram_budget={ram_budget}"
        if patches is not None:
            opt += f" with patches={patches}"
        raise BackendError(
            f"{opt}: cannot be met: no cut and grid gives an arena below {smallest[0]} bytes "
            f"({smallest[1]}; without patches {base} bytes)"
        )
    p = best[1]
    p.info["arena_unpatched_bytes"] = base
    p.info["arena_patched_bytes"] = best[2]
    return p, base
