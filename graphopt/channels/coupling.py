"""The element index of a channel analysis and the facts recorded on it.

:class:`Coupling` lays out the *spaces* of node outputs (a dim, or a joint run of dims, with
flat row-major element numbering), records the primitive facts the rules state about them
(:meth:`~Coupling.couple` two element arrays, :meth:`~Coupling.lock` a space with a reason,
a parameter :class:`~.records.Member`) and offers the two generic couplings most rules reduce
to: :meth:`~Coupling.elementwise` (right-aligned broadcasting) and
:meth:`~Coupling.passthrough_dims` (a dim map, locking what it does not carry).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx

from graphopt.graph import Graph, node_meta

from .records import Member, Rewrite, Space


def fn_name(node: fx.Node) -> str:
    """The name of a call's target (the method name, or the function's ``__name__``)."""
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class Coupling:
    """Spaces of one Graph's node outputs and the couplings, locks and members stated on them."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.gm = graph.module
        self.spaces: list[Space] = []
        self.layout: dict[tuple[str, int], list[Space]] = {}
        self.members: list[Member] = []
        self.rewrites: list[Rewrite] = []
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self._locks: list[tuple[np.ndarray, str]] = []
        self._n = 0
        self.lock_reasons: dict[int, str] = {}  # space id -> first reason
        self.stat_spaces: set[int] = set()  # spaces normalised by LayerNorm/GroupNorm statistics
        self.size_pairs: list[tuple[int, int, str]] = []  # spaces whose sizes must stay equal

    # -- spaces -------------------------------------------------------------------------------
    def _shape(self, node: Any, out: int = 0) -> tuple[int, ...] | None:
        if not isinstance(node, fx.Node):
            return None
        outs = node_meta(node).outputs
        if out < len(outs):
            return outs[out].shape
        return None

    def _new_space(
        self, node: str, out: int, dims: tuple[int, ...], sizes: tuple[int, ...], inner: int
    ) -> Space:
        s = Space(len(self.spaces), node, out, dims, sizes, self._n, inner)
        self._n += s.size
        self.spaces.append(s)
        return s

    def _make_layout(
        self,
        node: fx.Node,
        out: int,
        groups: list[tuple[int, ...]] | None = None,
        inner: dict | None = None,
    ) -> list[Space]:
        """Create the spaces of one node output: ``groups`` lists joint dims; others single."""
        shape = self._shape(node, out)
        if shape is None:
            return []
        joint = {g[0]: g for g in (groups or []) if len(g) > 1}
        spaces = []
        d = 0
        while d < len(shape):
            dims = joint.get(d, (d,))
            sizes = tuple(shape[i] for i in dims)
            spaces.append(
                self._new_space(node.name, out, dims, sizes, (inner or {}).get(dims, dims[-1]))
            )
            d += len(dims)
        self.layout[(node.name, out)] = spaces
        return spaces

    def spaces_of(self, node: Any, out: int = 0) -> list[Space]:
        if not isinstance(node, fx.Node):
            return []
        key = (node.name, out)
        if key not in self.layout:
            self._make_layout(node, out)
        return self.layout[key]

    def layout_shape(self, name: str, out: int = 0) -> tuple[int, ...]:
        """The traced shape of a node output, as covered by its spaces."""
        return tuple(sz for s in self.layout.get((name, out), []) for sz in s.sizes)

    def space_at(self, node: Any, dim: int, out: int = 0) -> Space | None:
        for s in self.spaces_of(node, out):
            if dim in s.dims:
                return s
        return None

    @staticmethod
    def _space_with_dims(spaces: list[Space], dims: tuple[int, ...]) -> Space | None:
        for s in spaces:
            if s.dims == dims:
                return s
        return None

    # -- primitive facts --------------------------------------------------------------------------
    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        if a.size:
            self._edges.append((a, b))

    def couple_spaces(self, a: Space, b: Space) -> bool:
        """Identity coupling of two spaces with the same dims structure; False if impossible."""
        if a.sizes != b.sizes:
            return False
        self.couple(a.elements(), b.elements())
        return True

    def couple_spaces_flat(self, a: Space, b: Space) -> None:
        self.couple(a.elements(), b.elements())

    def lock(self, space: Space | None, reason: str) -> None:
        if space is None:
            return
        self._locks.append((space.elements(), reason))
        self.lock_reasons.setdefault(space.id, reason)

    def lock_node(self, node: Any, reason: str, out: int | None = None) -> None:
        if not isinstance(node, fx.Node):
            return
        outs = range(len(node_meta(node).outputs)) if out is None else [out]
        for o in outs:
            for s in self.spaces_of(node, o):
                self.lock(s, reason)

    def member(
        self, owner: str, param: str, dim: int, space: Space, index_map: np.ndarray, kind: str
    ) -> None:
        self.members.append(
            Member(owner, param, dim, space.id, np.asarray(index_map, dtype=np.int64), kind)
        )

    def _tensor_inputs(self, node: fx.Node) -> list[tuple[fx.Node, int]]:
        return [(a, i) for a in node.all_input_nodes for i in range(len(node_meta(a).outputs))]

    def _lock_all(self, node: fx.Node, reason: str) -> None:
        for a, o in self._tensor_inputs(node):
            self.lock_node(a, reason, o)
        self.lock_node(node, reason)

    # -- generic couplings -----------------------------------------------------------------------
    def elementwise(self, node: fx.Node, inputs: list[Any]) -> bool:
        """Right-aligned broadcasting: couple each non-broadcast input dim with the output dim."""
        out_shape = self._shape(node)
        if out_shape is None:
            return False
        tensors = [a for a in inputs if isinstance(a, fx.Node) and self._shape(a) is not None]
        # Layout of the output follows the first full-rank input (keeps joint spaces).
        ref = next((a for a in tensors if self._shape(a) == out_shape), None)
        if ref is not None and (node.name, 0) not in self.layout:
            groups = [s.dims for s in self.spaces_of(ref)]
            inner = {s.dims: s.inner for s in self.spaces_of(ref)}
            self._make_layout(node, 0, groups, inner)
        out_spaces = self.spaces_of(node)
        coupled_out = set()
        for a in tensors:
            shape = self._shape(a)
            offset = len(out_shape) - len(shape)
            for s in self.spaces_of(a):
                sizes_out = tuple(out_shape[d + offset] for d in s.dims)
                if all(x == 1 for x in s.sizes) and any(x != 1 for x in sizes_out):
                    continue  # broadcast: no coupling
                target = self._space_with_dims(out_spaces, tuple(d + offset for d in s.dims))
                if target is None or target.sizes != s.sizes:
                    if s.sizes != sizes_out:
                        # partial broadcast inside a joint space, or mismatched structure
                        self.lock(s, f"{node.name}: broadcast over {s.dims}")
                        continue
                    self.lock(s, f"{node.name}: layout mismatch")
                    for t in out_spaces:
                        if set(t.dims) & {d + offset for d in s.dims}:
                            self.lock(t, f"{node.name}: layout mismatch")
                    continue
                self.couple_spaces(s, target)
                coupled_out.add(target.id)
        for t in out_spaces:
            if t.id not in coupled_out:
                self.lock(t, f"{node.name}: output dims {t.dims} not from an input")
        return True

    def passthrough_dims(
        self,
        node: fx.Node,
        src: fx.Node,
        dim_map: dict[int, int],
        out: int = 0,
        src_out: int = 0,
        consumed: tuple[int, ...] = (),
        produced: tuple[int, ...] = (),
    ) -> None:
        """Couple ``src`` dim ``dim_map[o]`` with output dim ``o``; lock every other dim except
        the input dims a parameter ``consumed`` and the output dims a parameter ``produced``."""
        in_spaces = self.spaces_of(src, src_out)
        inv = {v: k for k, v in dim_map.items()}
        groups, inner = [], {}
        for s in in_spaces:
            if len(s.dims) > 1 and all(d in inv for d in s.dims):
                od = tuple(sorted(inv[d] for d in s.dims))
                if od == tuple(range(od[0], od[0] + len(od))):
                    groups.append(od)
                    inner[od] = inv[s.inner]
        if (node.name, out) not in self.layout:
            self._make_layout(node, out, groups, inner)
        out_spaces = self.spaces_of(node, out)
        coupled_out = set()
        for s in in_spaces:
            if s.dims in [(d,) for d in consumed]:
                continue
            if not all(d in inv for d in s.dims):
                self.lock(s, f"{node.name}: consumes dims {s.dims}")
                continue
            od = tuple(inv[d] for d in s.dims)
            t = self._space_with_dims(out_spaces, od)
            if t is None and len(od) > 1:
                # joint space whose dims were permuted but stay adjacent in a new order
                t = self._space_with_dims(out_spaces, tuple(sorted(od)))
                if t is not None and t.size == s.size:
                    perm = [sorted(od).index(x) for x in od]
                    idx = np.arange(s.size).reshape(s.sizes).transpose(np.argsort(perm))
                    self.couple(s.base + idx.reshape(-1), t.elements())
                    coupled_out.add(t.id)
                    continue
            if t is None or t.size != s.size:
                self.lock(s, f"{node.name}: dims {s.dims} not preserved")
                continue
            self.couple_spaces(s, t)
            coupled_out.add(t.id)
        for t in out_spaces:
            if t.id not in coupled_out and t.dims not in [(d,) for d in produced]:
                self.lock(t, f"{node.name}: fixed-size output dims {t.dims}")
