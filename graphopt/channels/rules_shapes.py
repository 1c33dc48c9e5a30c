"""Channel rules for the shape ops: flatten and row-major merges, reshape/view (splits into a
joint space, merges, size arguments read from other tensors), transpose/permute, concat
(offsets), split/chunk, getitem (tuple elements, channel slices) and reductions."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch.fx as fx

from graphopt.graph import node_meta

from .coupling import Coupling, fn_name
from .records import Rewrite, Space


class ShapeRules(Coupling):
    """The shape-op rules (a mixin of :class:`~.analysis.ChannelAnalysis`)."""

    def _flatten(self, node, x, start, end) -> bool:
        shape = self._shape(x)
        nd = len(shape)
        start, end = start % nd, end % nd
        if start == end:
            return self.elementwise(node, [x])
        dim_map = {d: d for d in range(start)}
        dim_map.update({d - (end - start): d for d in range(end + 1, nd)})
        out = self._make_layout(node, 0)
        merged = self.space_at(node, start)
        # couple the untouched dims
        for o, i in dim_map.items():
            s, t = self.space_at(x, i), self.space_at(node, o)
            if s is None or t is None or len(s.dims) != 1 or not self.couple_spaces(s, t):
                self.lock(s, f"{node.name}: flatten layout")
                self.lock(t, f"{node.name}: flatten layout")
        return self._merge(node, x, list(range(start, end + 1)), merged, out)

    def _merge(self, node, x, in_dims: list[int], merged: Space, out: list[Space]) -> bool:
        """Output dim ``merged`` is the row-major merge of ``in_dims`` of ``x``: couple it with
        the outermost non-singleton input dim and lock the inner ones."""
        shape = self._shape(x)
        sizes = [shape[d] for d in in_dims]
        spaces = [self.space_at(x, d) for d in in_dims]
        outer_i = next((i for i, s in enumerate(sizes) if s != 1), 0)
        outer = spaces[outer_i]
        if outer is None or any(len(s.dims) != 1 for s in spaces if s is not None and s.size > 1):
            # joint input spaces exactly covering the merge: flat identity
            uniq = []
            for s in spaces:
                if s is not None and s not in uniq:
                    uniq.append(s)
            if len(uniq) == 1 and uniq[0].dims == tuple(in_dims) and uniq[0].size == merged.size:
                self.couple_spaces_flat(uniq[0], merged)
                return True
            for s in uniq:
                self.lock(s, f"{node.name}: merge of joint dims")
            self.lock(merged, f"{node.name}: merge of joint dims")
            return True
        inner = int(np.prod(sizes[outer_i + 1 :])) if outer_i + 1 < len(sizes) else 1
        e = np.arange(merged.size)
        self.couple(outer.base + e // inner, merged.base + e)
        for s in spaces[outer_i + 1 :]:
            self.lock(s, f"{node.name}: inner dim of a merge")
        self.rewrites.append(Rewrite(node.name, "merge", {}))
        return True

    def _reshape(self, node, x, target) -> bool:
        shape_in = self._shape(x)
        shape_out = self._shape(node)
        if shape_in is None or shape_out is None:
            return False
        groups = _reshape_groups(shape_in, shape_out)
        if groups is None:
            self._lock_all(node, f"{node.name}: reshape {shape_in} -> {shape_out} not understood")
            return True
        joint, inner = [], {}
        for gi, go in groups:
            if len(gi) == 1 and len(go) > 1:
                joint.append(tuple(go))
                inner[tuple(go)] = go[-1]
        self._make_layout(node, 0, joint, inner)
        for gi, go in groups:
            in_spaces = [self.space_at(x, d) for d in gi]
            out_spaces = [self.space_at(node, d) for d in go]
            if len(gi) == 1 and len(go) == 1:
                s, t = in_spaces[0], out_spaces[0]
                if s is None or t is None or not self.couple_spaces(s, t):
                    self.lock(s, f"{node.name}: reshape")
                    self.lock(t, f"{node.name}: reshape")
            elif len(gi) == 1:
                s, t = in_spaces[0], out_spaces[0]
                if s is None or len(s.dims) != 1 or t.size != s.size:
                    self.lock(s, f"{node.name}: reshape split")
                    self.lock(t, f"{node.name}: reshape split")
                    continue
                # split: flat identity, plus rectangular removal (couple across outer dims)
                self.couple(s.elements(), t.elements())
                inner_size = t.sizes[-1]
                e = np.arange(t.size)
                self.couple(t.base + e, t.base + e % inner_size)
            elif len(go) == 1:
                self._merge(node, x, list(gi), out_spaces[0], [])
            else:
                for s in in_spaces + out_spaces:
                    self.lock(s, f"{node.name}: many-to-many reshape")
        self._size_constraints(node, target)
        self.rewrites.append(Rewrite(node.name, "reshape", {}))
        return True

    def _size_constraints(self, node: fx.Node, target: Any) -> None:
        """A reshape whose size arguments are read from some tensor's shape requires that dim
        to keep the same size as the output dim it defines: record the pair of spaces."""
        vals = list(target) if isinstance(target, (list, tuple)) else [target]
        for d, v in enumerate(vals):
            if not isinstance(v, fx.Node):
                continue
            out = self.space_at(node, d)
            for src, k in _size_sources(v):
                sp = self.space_at(src, k % max(1, len(self._shape(src) or (1,))))
                if out is not None and sp is not None:
                    self.size_pairs.append((out.id, sp.id, node.name))

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
            if s is None or len(s.dims) != 1 or t is None:
                self.lock(s, f"{node.name}: concat of a joint layout")
                self.lock(t, f"{node.name}: concat of a joint layout")
            else:
                self.couple(s.elements(), t.base + offset + np.arange(s.size))
            for d in range(nd):
                if d == dim:
                    continue
                si, so = self.space_at(a, d), self.space_at(node, d)
                if si is None or len(si.dims) != 1 or not self.couple_spaces(si, so):
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
        if s is None or len(s.dims) != 1:
            self._lock_all(node, f"{node.name}: split of a joint layout")
            return True
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
                if si is None or len(si.dims) != 1 or not self.couple_spaces(si, so):
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
            self._make_layout(
                node, 0, [s.dims for s in src_spaces], {s.dims: s.inner for s in src_spaces}
            )
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
            if s_in is None or s_out is None or len(s_in.dims) != 1 or len(s_out.dims) != 1:
                self.lock(s_in, f"{node.name}: slice of a joint layout")
                self.lock(s_out, f"{node.name}: slice of a joint layout")
                continue
            # channel slicing: output k is input start + k; the bounds move when channels go
            self.couple(s_in.base + start + np.arange(n), s_out.elements())
            self.rewrites.append(
                Rewrite(node.name, "slice", {"pos": pos, "space": s_in.id, "start": start, "n": n})
            )
        return True

    def _reduce(self, node, x, dim, keepdim) -> bool:
        shape = self._shape(x)
        nd = len(shape)
        if dim is None:
            self._lock_all(node, f"{node.name}: full reduction")
            return True
        dims = {d % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
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
