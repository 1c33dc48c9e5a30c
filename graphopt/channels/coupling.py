"""The element index of a channel analysis and the facts recorded on it.

:class:`Coupling` lays out the *spaces* of node outputs (one per dim, an element per index),
records the primitive facts the rules state about them (:meth:`~Coupling.couple` two element
arrays, :meth:`~Coupling.lock` a space with a reason, a parameter :class:`~.records.Member`)
and offers the two generic couplings most rules reduce to: :meth:`~Coupling.elementwise`
(right-aligned broadcasting) and :meth:`~Coupling.passthrough_dims` (a dim map, locking what
it does not carry).

While the rules are stated (in topological order) the index also tracks which spaces *bear*
channels: a space coupled, so far, to the output channels of some producer. A reshape that
merges or splits dims reads it to pick the dim it prunes along (see
:meth:`~.rules_shapes.ShapeRules._regroup`); it changes no coupling, only which sound choice
is made.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from graphopt.graph import Graph, find_module, modules_by_path, node_meta

from .components import unique
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
        self.modules = modules_by_path(self.gm)
        self.spaces: list[Space] = []
        self.layout: dict[tuple[str, int], list[Space]] = {}
        self.members: list[Member] = []
        self._member_at: dict[tuple[str, str, int, str], int] = {}  # first slot of a parameter
        self.rewrites: list[Rewrite] = []
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self._locks: list[tuple[np.ndarray, str]] = []
        self._n = 0
        self.lock_reasons: dict[int, str] = {}  # space id -> first reason
        self.stat_spaces: set[int] = set()  # spaces normalised by LayerNorm/GroupNorm statistics
        # (target space, source space, reshape node, dim, rescalable): a reshape size argument
        # computed from another tensor's size; the solver decides how it stays valid
        self.size_pairs: list[tuple[int, int, str, int, bool]] = []
        self.size_modes: dict[tuple[str, int], str] = {}  # (node, dim) -> "rescale"/"constant"
        self.bearing: set[int] = set()  # spaces coupled to a producer's output channels so far
        self.head_spaces: set[int] = set()  # head axes of attention products
        self._bases: list[int] = []
        self._base_arr = np.zeros(0, dtype=np.int64)

    def module(self, path: str) -> torch.nn.Module:
        """The submodule at ``path`` (``get_submodule``'s error if there is none)."""
        return find_module(self.gm, self.modules, path)

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
        self._bases.append(s.base)
        return s

    def _make_layout(self, node: fx.Node, out: int = 0) -> list[Space]:
        """Create the spaces of one node output, one per dim."""
        shape = self._shape(node, out)
        if shape is None:
            return []
        spaces = [self._new_space(node.name, out, (d,), (n,), d) for d, n in enumerate(shape)]
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

    # -- primitive facts --------------------------------------------------------------------------
    def couple(
        self,
        a: np.ndarray,
        b: np.ndarray,
        spaces: tuple[list[int], list[int]] | None = None,
    ) -> None:
        """Couple element ``a[i]`` with ``b[i]``; ``spaces`` (the space ids of ``a`` and of
        ``b``) spares the lookup when the caller knows them."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        if a.size:
            self._edges.append((a, b))
            if self.bearing:
                sa, sb = spaces or (self._space_ids(a), self._space_ids(b))
                if self.bearing.intersection(sa) or self.bearing.intersection(sb):
                    self.bearing.update(sa)
                    self.bearing.update(sb)

    def _space_ids(self, elems: np.ndarray) -> list[int]:
        """The spaces the given elements belong to."""
        if len(self._base_arr) != len(self._bases):
            self._base_arr = np.asarray(self._bases, dtype=np.int64)
        idx = np.searchsorted(self._base_arr, elems, side="right") - 1
        return unique(idx).tolist()

    def couple_spaces(self, a: Space, b: Space) -> bool:
        """Identity coupling of two spaces of the same size; False if impossible."""
        if a.sizes != b.sizes:
            return False
        self.couple(a.elements(), b.elements(), ([a.id], [b.id]))
        return True

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
        """State that ``owner.param`` along ``dim`` shrinks with ``space`` (see :class:`Member`).

        A module called at several places (a shared block, a weight-tied or recurrent layer)
        states its parameters once per call site: the first call site's slot becomes the
        member and every later one is *coupled* to it, index by index (parameter index ``k``
        is one physical slice, so the elements it maps to at every call site go together).
        The shared module is thereby one unit with the producers and consumers of every call
        site, scored once per parameter (Taylor gradients sum over the call sites by
        themselves) and sliced once.
        """
        index_map = np.asarray(index_map, dtype=np.int64)
        key = (owner, param, dim, kind)
        first = self._member_at.get(key)
        if first is not None:
            m = self.members[first]
            if m.space != space.id or not np.array_equal(m.index_map, index_map):
                if len(m.index_map) != len(index_map):
                    self.lock(self.spaces[m.space], f"{owner}.{param}: call sites disagree")
                    self.lock(space, f"{owner}.{param}: call sites disagree")
                    return
                self.couple(self.spaces[m.space].base + m.index_map, space.base + index_map)
            return
        self._member_at[key] = len(self.members)
        self.members.append(Member(owner, param, dim, space.id, index_map, kind))
        if kind == "out":
            self.bearing.add(space.id)

    def _tensor_inputs(self, node: fx.Node) -> list[tuple[fx.Node, int]]:
        return [(a, i) for a in node.all_input_nodes for i in range(len(node_meta(a).outputs))]

    def _lock_all(self, node: fx.Node, reason: str) -> None:
        for a, o in self._tensor_inputs(node):
            self.lock_node(a, reason, o)
        self.lock_node(node, reason)

    def _reaches_heads(self, node: fx.Node, dim: int) -> bool:
        """Whether a dim becomes an attention head axis (the attention rules know)."""
        return False

    def _reaches_channels(self, node: fx.Node, dim: int) -> bool:
        """Whether a dim becomes the channel axis a layer reads (the attention rules know)."""
        return False

    # -- generic couplings -----------------------------------------------------------------------
    def elementwise(self, node: fx.Node, inputs: list[Any]) -> bool:
        """Right-aligned broadcasting: couple each non-broadcast input dim with the output dim."""
        out_shape = self._shape(node)
        if out_shape is None:
            return False
        tensors = [a for a in inputs if isinstance(a, fx.Node) and self._shape(a) is not None]
        out_spaces = self.spaces_of(node)
        coupled_out = set()
        for a in tensors:
            offset = len(out_shape) - len(self._shape(a))
            for s in self.spaces_of(a):
                t = self.space_at(node, s.dims[0] + offset)
                if s.size == 1 and t is not None and t.size != 1:
                    continue  # broadcast: no coupling
                if t is None or not self.couple_spaces(s, t):
                    self.lock(s, f"{node.name}: layout mismatch")
                    self.lock(t, f"{node.name}: layout mismatch")
                    continue
                coupled_out.add(t.id)
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
        inv = {v: k for k, v in dim_map.items()}
        coupled_out = set()
        for s in self.spaces_of(src, src_out):
            d = s.dims[0]
            if d in consumed:
                continue
            t = self.space_at(node, inv[d], out) if d in inv else None
            if t is None or not self.couple_spaces(s, t):
                why = "consumes" if t is None else "does not preserve"
                self.lock(s, f"{node.name}: {why} dim {d}")
                continue
            coupled_out.add(t.id)
        for t in self.spaces_of(node, out):
            if t.id not in coupled_out and t.dims[0] not in produced:
                self.lock(t, f"{node.name}: fixed-size output dims {t.dims}")
