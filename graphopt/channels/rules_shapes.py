"""Channel rules for the shape ops: flatten, reshape/view/unflatten (re-splits of dims along a
carrier factor, size arguments read from other tensors), transpose/permute, squeeze, select,
concat (offsets), split/chunk, getitem (tuple elements, channel slices) and reductions."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from graphopt.graph import node_meta

from .coupling import Coupling, fn_name
from .records import Rewrite


class ShapeRules(Coupling):
    """The shape-op rules (a mixin of :class:`~.analysis.ChannelAnalysis`)."""

    def _flatten(self, node, x, start, end) -> bool:
        nd = len(self._shape(x))
        start, end = start % nd, end % nd
        if start == end:
            return self.elementwise(node, [x])
        self._make_layout(node, 0)
        dim_map = {d: d for d in range(start)}
        dim_map.update({d - (end - start): d for d in range(end + 1, nd)})
        for o, i in dim_map.items():
            s, t = self.space_at(x, i), self.space_at(node, o)
            if s is None or t is None or not self.couple_spaces(s, t):
                self.lock(s, f"{node.name}: flatten layout")
                self.lock(t, f"{node.name}: flatten layout")
        self._regroup(node, x, list(range(start, end + 1)), [start])
        return True

    def _regroup(self, node: fx.Node, x: fx.Node, gi: list[int], go: list[int]) -> None:
        """Output dims ``go`` of ``node`` are a row-major re-split of input dims ``gi`` of ``x``.

        Both sides factor into the common refinement ``r_1 ... r_m`` (sizes whose running
        products hit every input and every output boundary: ``[B, H·D] -> [B·H, D]`` refines to
        ``[B, H, D]``). Removal must stay a rectangle so every later reshape stays valid, so one
        refined factor ``r*``, the *carrier*, is pruned: input element ``i`` and output element
        ``o`` are coupled when their ``r*`` indices agree, and every dim not containing ``r*``
        is locked (kept whole). Any carrier is sound; the useful one is picked:

        - a split (one input dim): the output dim that reaches the head axis of an attention
          product (``[B, T, H·D] -> [B, T, H, D]`` prunes whole heads), else the innermost one
          that reaches the channel axis of a layer (``fc(z).view(B, C, H, W)`` feeding a conv
          or a norm prunes whole channels: the linear's ``H·W`` features of channel ``c`` with
          the conv's input channel ``c``), else the innermost (``[N, C] -> [N, g, C/g]``
          removes the same position from every group);
        - a merge (one output dim): the input dim bearing producer channels (``[B, H, T, D]``
          transposed and merged back prunes heads; ``flatten`` of ``[C, H, W]`` prunes ``C``),
          else the outermost;
        - both: a factor of a channel-bearing input dim, preferring one inside an output dim
          that reaches an attention head axis (``[T, B, H·D] -> [T, B·H, D]`` in
          ``nn.MultiheadAttention``'s exported form prunes ``H``).
        """
        si = [self._shape(x)[d] for d in gi]
        so = [self._shape(node)[d] for d in go]
        ins = [self.space_at(x, d) for d in gi]
        outs = [self.space_at(node, d) for d in go]
        ref = _refine(si, so)
        if ref is None or any(s is None for s in ins + outs):
            for s in ins + outs:
                self.lock(s, f"{node.name}: many-to-many reshape {si} -> {so}")
            return
        sizes, in_span, out_span = ref
        r = self._carrier(node, x, gi, go, sizes, in_span, out_span)
        if r is None:
            for s in ins + outs:
                self.lock(s, f"{node.name}: reshape {si} -> {so} of size-1 dims")
            return
        first = None
        for spaces, spans in ((outs, out_span), (ins, in_span)):
            for s, (a, b) in zip(spaces, spans):
                if not a <= r < b:
                    self.lock(
                        s,
                        f"{node.name}: dim {s.dims[0]} ({s.size}) of a reshape {si} -> {so} is "
                        f"kept whole; it prunes along a factor of size {sizes[r]}",
                    )
                    continue
                e = np.arange(s.size)
                idx = (e // int(np.prod(sizes[r + 1 : b]))) % sizes[r]
                if first is None:  # the first element of each carrier index, in the output
                    first = s.base + np.unique(idx, return_index=True)[1]
                self.couple(s.base + e, first[idx])
        if len(go) == 1:
            self.rewrites.append(Rewrite(node.name, "merge", {}))

    def _carrier(self, node, x, gi, go, sizes, in_span, out_span) -> int | None:
        """The refined factor a re-split prunes along (see :meth:`_regroup`)."""
        big = [i for i, n in enumerate(sizes) if n > 1]
        if not big:
            return None

        def factors(spans, dims_ok):
            return [i for (a, b), ok in zip(spans, dims_ok) if ok for i in range(a, b) if i in big]

        bearing = factors(in_span, [self.space_at(x, d).id in self.bearing for d in gi])
        if len(go) == 1:
            return bearing[0] if bearing else big[0]
        heads = factors(out_span, [self._reaches_heads(node, d) for d in go])
        if len(gi) == 1:
            if heads:
                return heads[0]
            chans = factors(out_span, [self._reaches_channels(node, d) for d in go])
            return chans[-1] if chans else big[-1]
        both = [i for i in bearing if i in heads]
        return both[0] if both else (bearing[0] if bearing else big[0])

    def _reshape(self, node, x, target, kind: str = "reshape") -> bool:
        """``view`` / ``reshape`` (and ``unflatten``: ``kind``): dims whose sizes pair up are
        coupled one to one, the others re-split (:meth:`_regroup`); the surgery rewrites the
        constant sizes."""
        shape_in = self._shape(x)
        shape_out = self._shape(node)
        if shape_in is None or shape_out is None:
            return False
        groups = _reshape_groups(shape_in, shape_out)
        if groups is None:
            self._lock_all(node, f"{node.name}: reshape {shape_in} -> {shape_out} not understood")
            return True
        self._make_layout(node, 0)
        packed = list(target) if isinstance(target, (list, tuple)) else [target]
        if len(shape_out) > 1 and len(packed) == 1 and isinstance(packed[0], fx.Node):
            self._whole_shape(node, packed[0])
            target = None
        for gi, go in groups:
            if len(gi) == 1 and len(go) == 1:
                s, t = self.space_at(x, gi[0]), self.space_at(node, go[0])
                if s is None or t is None or not self.couple_spaces(s, t):
                    self.lock(s, f"{node.name}: reshape")
                    self.lock(t, f"{node.name}: reshape")
            else:
                self._regroup(node, x, gi, go)
        if target is not None:
            self._size_constraints(node, target)
        self.rewrites.append(Rewrite(node.name, kind, {}))
        return True

    def _whole_shape(self, node: fx.Node, v: fx.Node) -> None:
        """A reshape whose whole shape is one computed value. ``x.size()[:k] + (n, ...)``
        (Hugging Face's ``Conv1D``): the first ``k`` dims read from ``x`` are kept (locked on
        both sides), the constant tail is rewritten by the surgery (``"shape_tail"``). Any
        other computed shape cannot be rewritten: no output dim may change."""
        found = _size_prefix(v)
        out = self.spaces_of(node)
        src_shape = self._shape(found[0]) if found else None
        k = None
        if src_shape is not None and -len(src_shape) <= found[1] <= len(src_shape):
            k = found[1] if found[1] >= 0 else len(src_shape) + found[1]
        if k is None or len(out) != k + len(v.args[1]):
            for s in out:
                self.lock(s, f"{node.name}: its shape is computed as one value {v.name}")
            return
        src = found[0]
        for d in range(k):
            reason = f"{node.name}: dim {d} of its shape is read from {src.name}"
            self.lock(out[d], reason)
            self.lock(self.space_at(src, d), reason)
        self.rewrites.append(Rewrite(node.name, "shape_tail", {"value": v.name, "k": k}))

    def _size_constraints(self, node: fx.Node, target: Any) -> None:
        """A size argument computed from some tensor's shape: record (target space, source
        space) pairs; the solver keeps them consistent (same units), or lets the surgery
        rescale an integer factor of a product (``B * 4`` heads) with the source kept fixed,
        or write the new size as a constant when the source is locked anyway, or locks both."""
        vals = list(target) if isinstance(target, (list, tuple)) else [target]
        for d, v in enumerate(vals):
            if not isinstance(v, fx.Node):
                continue
            out = self.space_at(node, d)
            scalable = bool(int_factors(v))
            for src, k in _size_sources(v):
                sp = self.space_at(src, k % max(1, len(self._shape(src) or (1,))))
                if out is not None and sp is not None:
                    self.size_pairs.append((out.id, sp.id, node.name, d, scalable))

    def _transpose(self, node, x, d0, d1) -> bool:
        nd = len(self._shape(x))
        d0, d1 = d0 % nd, d1 % nd
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self._permute(node, x, perm)

    def _permute(self, node, x, dims) -> bool:
        nd = len(self._shape(x))
        dims = [int(d) % nd for d in dims]
        self.passthrough_dims(node, x, {o: i for o, i in enumerate(dims)})
        return True

    def _cat(self, node, tensors, dim) -> bool:
        out_shape = self._shape(node)
        nd = len(out_shape)
        dim = dim % nd
        self._make_layout(node, 0)
        t = self.space_at(node, dim)
        offset = 0
        for a in tensors:
            shape = self._shape(a)
            if shape is None:
                return False
            s = self.space_at(a, dim)
            self.couple(s.elements(), t.base + offset + np.arange(s.size))
            for d in range(nd):
                if d == dim:
                    continue
                si, so = self.space_at(a, d), self.space_at(node, d)
                if not self.couple_spaces(si, so):
                    self.lock(si, f"{node.name}: concat layout")
                    self.lock(so, f"{node.name}: concat layout")
            offset += shape[dim]
        return True

    def _split_args(self, node) -> tuple[Any, int, str]:
        args, kw = node.args, node.kwargs
        name = fn_name(node)
        second = (
            args[1]
            if len(args) > 1
            else kw.get("chunks", kw.get("split_size_or_sections", kw.get("split_size")))
        )
        dim = args[2] if len(args) > 2 else kw.get("dim", 0)
        return second, dim, name

    def _split(self, node, x, second, dim, name) -> bool:
        shape = self._shape(x)
        nd = len(shape)
        dim = dim % nd
        outs = node_meta(node).outputs
        s = self.space_at(x, dim)
        offset = 0
        for k, info in enumerate(outs):
            spaces = self._make_layout(node, k)
            t = spaces[dim] if dim < len(spaces) else None
            n = info.shape[dim]
            self.couple(s.base + offset + np.arange(n), t.elements())
            for d in range(nd):
                if d == dim:
                    continue
                si, so = self.space_at(x, d), self.space_at(node, d, k)
                if not self.couple_spaces(si, so):
                    self.lock(si, f"{node.name}: split layout")
                    self.lock(so, f"{node.name}: split layout")
            offset += n
        self.rewrites.append(Rewrite(node.name, "split", {"dim": dim}))
        return True

    def _getitem(self, node) -> bool:
        src, idx = node.args
        if isinstance(src, fx.Node) and node_meta(src).container:
            if not isinstance(idx, int) or idx >= len(node_meta(src).outputs):
                return False
            # element of a tuple-returning op (split/chunk): same spaces
            src_spaces = self.spaces_of(src, idx)
            for a, b in zip(src_spaces, self.spaces_of(node)):
                self.couple_spaces(a, b)
            return True
        shape = self._shape(src)
        if shape is None:
            return False
        items = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(it, fx.Node) for it in items):
            return False
        n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
        dim_map, d_in, d_out = {}, 0, 0
        sliced: list[tuple[int, int, int, int, int]] = []  # (item, dim in, dim out, start, len)
        for it in items:
            if it is Ellipsis:
                for _ in range(len(shape) - n_real):
                    dim_map[d_out] = d_in
                    d_in += 1
                    d_out += 1
                continue
            if it is None:
                d_out += 1
                continue
            if isinstance(it, slice) and it == slice(None):
                dim_map[d_out] = d_in
                d_in += 1
                d_out += 1
                continue
            if isinstance(it, int):
                self.lock(self.space_at(src, d_in), f"{node.name}: indexes dim {d_in}")
                d_in += 1
                continue
            if isinstance(it, slice):
                rng = range(shape[d_in])[it]
                if it.step not in (None, 1) or not all(
                    isinstance(v, (int, type(None))) for v in (it.start, it.stop)
                ):
                    # removing any channel would shift which ones a strided slice reads
                    self.lock(self.space_at(src, d_in), f"{node.name}: strided slice of dim {d_in}")
                else:
                    sliced.append((items.index(it), d_in, d_out, rng.start, len(rng)))
                d_in += 1
                d_out += 1
                continue
            return False
        while d_in < len(shape):
            dim_map[d_out] = d_in
            d_in += 1
            d_out += 1
        self.passthrough_dims(
            node,
            src,
            dim_map,
            consumed=tuple(x[1] for x in sliced),
            produced=tuple(x[2] for x in sliced),
        )
        for pos, di, do, start, n in sliced:
            s_in, s_out = self.space_at(src, di), self.space_at(node, do)
            # channel slicing: output k is input start + k; the bounds move when channels go
            self.couple(s_in.base + start + np.arange(n), s_out.elements())
            self.rewrites.append(
                Rewrite(node.name, "slice", {"pos": pos, "space": s_in.id, "start": start, "n": n})
            )
        return True

    def _squeeze(self, node, x, dim) -> bool:
        """Drop size-1 dims (``dim``: an int, a list, or None for all of them)."""
        shape = self._shape(x)
        nd = len(shape)
        dims = range(nd) if dim is None else dim if isinstance(dim, (list, tuple)) else [dim]
        gone = {d % nd for d in dims if shape[d % nd] == 1}
        kept = [d for d in range(nd) if d not in gone]
        self.passthrough_dims(node, x, dict(enumerate(kept)))
        return True

    def _select(self, node, x, dim) -> bool:
        """``x.select(dim, i)``: one index of ``dim`` (locked: its size is read), others pass."""
        nd = len(self._shape(x))
        dim = dim % nd
        self.lock(self.space_at(x, dim), f"{node.name}: indexes dim {dim}")
        self.passthrough_dims(node, x, dict(enumerate(d for d in range(nd) if d != dim)))
        return True

    def _reduce(self, node, x, dim, keepdim, statistic: bool = False) -> bool:
        """A reduction passes the dims it keeps and locks the ones it consumes, except a
        ``statistic``: a mean over the last dim with ``keepdim`` (the mean square of an
        RMSNorm, a hand-written LayerNorm's mean and variance) is computed over whatever width
        remains, so that width stays prunable as a statistics space, like a LayerNorm's."""
        shape = self._shape(x)
        nd = len(shape)
        if dim is None:
            self._lock_all(node, f"{node.name}: full reduction")
            return True
        dims = {d % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        if statistic and keepdim and dims == {nd - 1}:
            space = self.space_at(x, nd - 1)
            if space is not None and len(space.dims) == 1:
                self.stat_spaces.add(space.id)
                dim_map = {d: d for d in range(nd - 1)}
                self.passthrough_dims(node, x, dim_map, consumed=(nd - 1,), produced=(nd - 1,))
                return True
        dim_map, o = {}, 0
        for d in range(nd):
            if d in dims:
                if keepdim:
                    o += 1
                continue
            dim_map[o] = d
            o += 1
        self.passthrough_dims(node, x, dim_map)
        return True


_ARITH = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.truediv,
    operator.mod,
}


def _size_sources(v: Any, depth: int = 0) -> list[tuple[fx.Node, int]]:
    """``(tensor node, dim)`` pairs whose size an FX value was computed from."""
    if not isinstance(v, fx.Node) or depth > 8:
        return []
    if v.op == "call_function" and v.target is torch.ops.aten.sym_size.int:
        return [(v.args[0], v.args[1])]
    if (
        v.op == "call_method"
        and v.target == "size"
        and len(v.args) >= 2
        and isinstance(v.args[1], int)
    ):
        return [(v.args[0], v.args[1])]
    if v.op == "call_function" and v.target is operator.getitem and isinstance(v.args[1], int):
        src = v.args[0]
        if isinstance(src, fx.Node) and (
            (src.op == "call_method" and src.target == "size" and len(src.args) == 1)
            or (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
        ):
            return [(src.args[0], v.args[1])]
    if v.op == "call_function" and v.target in _ARITH:
        return [p for a in v.args for p in _size_sources(a, depth + 1)]
    return []


def _size_prefix(v: fx.Node) -> tuple[fx.Node, int] | None:
    """``(x, stop)`` when ``v`` is ``x.size()[:stop] + (ints...)`` (or ``x.shape[:stop] +
    ...``), else None."""
    if not (v.op == "call_function" and v.target is operator.add and len(v.args) == 2):
        return None
    head, tail = v.args
    if not (isinstance(tail, tuple) and all(type(t) is int for t in tail)):
        return None
    if not (isinstance(head, fx.Node) and head.target is operator.getitem):
        return None
    size, sl = head.args
    if not (isinstance(sl, slice) and sl.start in (None, 0) and sl.step in (None, 1)):
        return None
    if not isinstance(sl.stop, int) or not isinstance(size, fx.Node):
        return None
    if (size.op == "call_method" and size.target == "size" and len(size.args) == 1) or (
        size.op == "call_function" and size.target is getattr and size.args[1] == "shape"
    ):
        return size.args[0], sl.stop
    return None


def int_factors(v: Any) -> list[tuple[fx.Node, int]]:
    """``(mul node, arg position)`` of the integer constants of a product of sizes (``B * 4``,
    ``4 * (E // 4)``), outermost first; empty when ``v`` is not such a product."""
    if not (isinstance(v, fx.Node) and v.op == "call_function" and v.target is operator.mul):
        return []
    found = [(v, i) for i, a in enumerate(v.args) if type(a) is int]
    for a in v.args:
        found += int_factors(a)
    return found


def _refine(a: list[int], b: list[int]) -> tuple[list[int], list, list] | None:
    """The common row-major refinement of two factorisations of one size: the refined sizes
    and the ``[start, end)`` range of refined factors each dim of ``a`` and ``b`` spans."""
    cum_a = np.cumprod([1, *a]).tolist()
    cum_b = np.cumprod([1, *b]).tolist()
    bounds = sorted(set(cum_a) | set(cum_b))
    if cum_a[-1] != cum_b[-1] or any(y % x for x, y in zip(bounds, bounds[1:])):
        return None
    sizes = [y // x for x, y in zip(bounds, bounds[1:])]

    def spans(cum):
        return [(bounds.index(x), bounds.index(y)) for x, y in zip(cum, cum[1:])]

    return sizes, spans(cum_a), spans(cum_b)


def _reshape_groups(
    a: tuple[int, ...], b: tuple[int, ...]
) -> list[tuple[list[int], list[int]]] | None:
    """Pair consecutive dims of ``a`` and ``b`` whose products match (row-major reshape)."""
    groups = []
    i = j = 0
    while i < len(a) or j < len(b):
        gi, gj = [], []
        pa = pb = 1
        if i < len(a):
            gi.append(i)
            pa = a[i]
            i += 1
        if j < len(b):
            gj.append(j)
            pb = b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        # absorb trailing singleton dims into separate groups
        groups.append((gi, gj))
    return groups
