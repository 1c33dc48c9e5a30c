"""Channel-dependency analysis: which channels of which tensors must be removed together.

Every dimension of every tensor in the graph is an index *space*; each index of a space is an
*element*. Ops add couplings between elements (``conv -> bn -> relu -> add`` couples channel
``c`` of each tensor, a concat couples input channel ``c`` with output channel ``offset + c``,
a flatten couples output feature ``c*H*W + s`` with input channel ``c``, a channel shuffle
couples by its permutation). The connected components of that element graph are the
**units**: a unit is one "channel" that is removed everywhere at once. Units whose spaces are
touched in the same way form a **group**, ranked and pruned together.

Soundness comes from locking: an element is *locked* when its space meets a model input or
output, a leaf module, an op the analysis does not understand, or a dimension an op needs at
a fixed size (a reduced dimension, a spatial kernel input, a fresh output dimension). A lock
spreads to the whole unit, so only units every op agrees on can be removed. A unit is
*prunable* when it is unlocked and holds a producer (an output channel of a conv / linear /
embedding), so removing it saves work.

Shared modules: a module called at several places (the same conv applied twice, a block
reused across depth, a recurrent cell, a siamese encoder) states its parameters at each call
site; the later call sites are coupled index by index to the first
(:meth:`~.coupling.Coupling.member`), so the module is one unit with the producers and
consumers of every call site, scored once per parameter and sliced once.

Reshapes: a reshape that splits or merges dims factors both sides into their common row-major
refinement and prunes along one factor, the *carrier* (every other dim stays whole, so every
later reshape stays valid): ``[N, C] -> [N, g, C/g]`` removes the same position from every
group, ``flatten`` of ``[C, H, W]`` removes whole channels, ``fc(z).view(B, C, H, W)``
feeding a conv removes the linear's ``H·W`` features of channel ``c`` with the conv's input
channel ``c``, and ``[B, T, H·D] -> [B, T, H, D]`` feeding attention removes whole heads (:mod:`.rules_attention` couples q, k, v and the output
projection per head through the products). Size arguments computed in the graph are kept
valid: read at run time, rescaled (``B * H``) or written as constants (see
:meth:`ChannelAnalysis._size_pairs`).

Layout of the package: :mod:`.records` (the dataclasses), :mod:`.coupling` (spaces and the
primitive facts), :mod:`.rules_modules`, :mod:`.rules_calls`, :mod:`.rules_shapes` and
:mod:`.rules_attention` (what each op couples or locks), this module (the visit, the solver,
units and groups) and :mod:`.surgery` (removing units from a model). Build it with ``ChannelAnalysis(graph)`` or
``graph.cached(ChannelAnalysis)``.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict

import numpy as np
import torch
import torch.fx as fx

from graphopt.graph import Graph, node_meta

from .components import connected_components, unique
from .coupling import fn_name
from .records import Group, Member, Rewrite, Space
from .rules_attention import AttentionRules
from .rules_calls import CallRules
from .rules_modules import ModuleRules
from .rules_shapes import ShapeRules

__all__ = ["ChannelAnalysis", "Group", "Member", "Rewrite", "Space"]

log = logging.getLogger(__name__)


class ChannelAnalysis(ModuleRules, CallRules, ShapeRules, AttentionRules):
    """Spaces, couplings, locks, units and groups of one Graph (see the module docstring).

    Public results: :attr:`groups` (the prunable :class:`Group` s), :attr:`members` (the
    parameter slices, see :meth:`units_of`), :attr:`n_units`, :attr:`unit_prunable`,
    :attr:`unit_lock_reason` and :meth:`locked_summary`.
    """

    def __init__(self, graph: Graph):
        super().__init__(graph)
        self._build()
        self._solve()

    # -- building ------------------------------------------------------------------------------------
    def _build(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                handled = self._visit(node)
            except Exception as e:  # never crash: lock and explain
                log.debug("channel analysis: %s raised %s", node.name, e, exc_info=True)
                handled = False
                reason = f"{node.name}: analysis error {type(e).__name__}: {e}"
                self._lock_all(node, reason)
                continue
            if handled is False:
                self._lock_all(node, f"{node.name} ({_describe(self.gm, node)}) is not understood")

    def _visit(self, node: fx.Node) -> bool:
        op = node.op
        if op == "placeholder":
            self.lock_node(node, f"model input {node.name!r}")
            return True
        if op == "output":
            for a in node.all_input_nodes:
                self.lock_node(a, "model output")
            return True
        if op == "get_attr":
            return self._visit_get_attr(node)
        meta = node_meta(node)
        if not meta.outputs:
            # size(), dim(), getattr(x, "shape"), asserts: reading sizes is fine.
            if op == "call_method" and node.target in ("size", "dim"):
                return True
            if op == "call_function" and node.target in (getattr, torch._assert, operator.eq):
                return True
            if op == "call_function" and node.target is torch.ops.aten.sym_size.int:
                return True
            if op == "call_function" and node.target is operator.getitem:
                src = node.args[0]
                return not (isinstance(src, fx.Node) and len(node_meta(src).outputs) > 1)
            if not any(node_meta(a).outputs for a in node.all_input_nodes):
                return True  # pure arithmetic on sizes
            return False
        if op == "call_module":
            return self._visit_module(node, self.module(node.target))
        if op == "call_function":
            return self._visit_function(node)
        if op == "call_method":
            return self._visit_method(node)
        return False

    def _visit_get_attr(self, node: fx.Node) -> bool:
        # A parameter or buffer read directly: sliceable along any dim it is coupled on.
        for s in self.spaces_of(node):
            if len(s.dims) == 1:
                self.member(
                    _owner(node.target), _leaf(node.target), s.dims[0], s, np.arange(s.size), "attr"
                )
            else:
                self.lock(s, f"{node.target} joint dims")
        return True

    # -- solving -------------------------------------------------------------------------------------
    def _solve(self) -> None:
        """Units are the connected components of the element coupling graph.

        The components come from vectorised min-label propagation in numpy
        (:mod:`.components`), not networkx or scipy: on the element graph of torchvision
        resnet50 (105,931 elements, 90,853 coupling edges) and densenet121 (150,505 / 151,260)
        at 1x3x224x224, networkx (building the ``nx.Graph`` and ``connected_components``) took
        0.54-0.72 s, which made ``ChannelAnalysis`` 3.2x / 2.7x slower and trace + analysis
        1.8x slower; scipy's ``csgraph`` takes 3-4 ms but importing ``scipy.sparse`` costs about
        0.3 s cold, as much as the analysis itself. Labels are numbered in the order of each
        component's smallest element.
        """
        n = self._n
        if self._edges:
            a = np.concatenate([e[0] for e in self._edges])
            b = np.concatenate([e[1] for e in self._edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        self.n_units, self.labels = connected_components(n, a, b)
        self._size_pairs()
        # each unit's first lock; each lock's reason goes to the smallest unit it locks first
        n_locks = len(self._locks)
        first = np.full(self.n_units, n_locks, dtype=np.int64)
        if n_locks:
            which = np.repeat(np.arange(n_locks), [len(e) for e, _ in self._locks])
            np.minimum.at(first, self.labels[np.concatenate([e for e, _ in self._locks])], which)
        locked = first < n_locks
        lu = np.flatnonzero(locked)
        fl = first[lu]
        by_lock = np.argsort(fl, kind="stable")
        fl = fl[by_lock]
        new = np.r_[True, fl[1:] != fl[:-1]] if len(fl) else np.zeros(0, dtype=bool)
        self.unit_lock_reason: dict[int, str] = {
            u: self._locks[i][1] for u, i in zip(lu[by_lock][new].tolist(), fl[new].tolist())
        }
        self.unit_locked = locked
        self.element_space = np.zeros(n, dtype=np.int64)
        for s in self.spaces:
            self.element_space[s.base : s.base + s.size] = s.id
        produced = np.zeros(self.n_units, dtype=bool)
        for m in self.members:
            if m.kind == "out":
                produced[unique(self.units_of(m))] = True
        self.unit_prunable = produced & ~locked
        self._groups()

    def _size_pairs(self) -> None:
        """Keep every reshape size argument read from another tensor's shape valid.

        Same units on both sides: the size read at run time follows the pruning. Otherwise, in
        order: a product with an integer factor (``B * 4`` in ``[T, B·H, D]``) keeps its other
        factors' sources fixed (locked) and the surgery rescales the factor (``"rescale"``); a
        source locked anyway (a model input's width) lets the surgery write the new size as a
        constant (``"constant"``); else both are locked.
        """
        pre = np.zeros(self.n_units, dtype=bool)
        if self._locks:
            pre[self.labels[np.concatenate([e for e, _ in self._locks])]] = True
        for a_id, b_id, where, dim, scalable in self.size_pairs:
            sa, sb = self.spaces[a_id], self.spaces[b_id]
            ua = set(unique(self.labels[sa.elements()]).tolist())
            ub = set(unique(self.labels[sb.elements()]).tolist())
            if ua == ub:
                continue
            if scalable:
                self.size_modes[(where, dim)] = "rescale"
                reason = f"{where}: its size argument is a multiple of a size of {sb.node}"
                self._locks.append((sb.elements(), reason))
            elif pre[list(ub)].all():
                self.size_modes[(where, dim)] = "constant"
            else:
                reason = f"{where}: a shape read from {sb.node} sizes {sa.node}"
                self._locks.append((sa.elements(), reason))
                self._locks.append((sb.elements(), reason))

    def _groups(self) -> None:
        units = np.nonzero(self.unit_prunable)[0]
        self.groups: list[Group] = []
        if len(units) == 0:
            return
        mask = self.unit_prunable[self.labels]
        elems = np.nonzero(mask)[0]
        # the distinct (unit, space) pairs as one sorted integer key (np.unique with axis=0
        # is several times slower); a unit's signature is the sorted tuple of its spaces
        n_spaces = max(len(self.spaces), 1)
        keys = unique(self.labels[elems] * n_spaces + self.element_space[elems])
        pair_units, pair_spaces = keys // n_spaces, keys % n_spaces
        is_start = np.r_[True, pair_units[1:] != pair_units[:-1]]
        starts = np.flatnonzero(is_start)
        # one row per unit: its spaces, padded with -1; equal rows are one group
        row = np.cumsum(is_start) - 1
        col = np.arange(len(keys)) - starts[row]
        sigs = np.full((len(starts), int(col.max()) + 1), -1, dtype=np.int64)
        sigs[row, col] = pair_spaces
        order = np.lexsort(sigs.T[::-1])  # rows sorted; ties keep unit order
        new_sig = np.r_[True, (sigs[order[1:]] != sigs[order[:-1]]).any(axis=1)]
        group_of = np.empty(len(order), dtype=np.int64)
        group_of[order] = np.cumsum(new_sig) - 1
        firsts = order[new_sig]  # each group's first (smallest) unit, in group-number order
        unit_ids = pair_units[starts]
        member_by_space: dict[int, list[int]] = defaultdict(list)
        for i, m in enumerate(self.members):
            member_by_space[m.space].append(i)
        by_group = np.argsort(group_of, kind="stable")
        bounds = np.searchsorted(group_of[by_group], np.arange(len(firsts) + 1))
        # groups numbered in the order of their smallest unit
        for gid, g in enumerate(np.argsort(firsts, kind="stable").tolist()):
            rep = sigs[firsts[g]]
            sig = tuple(rep[rep >= 0].tolist())
            us = unit_ids[by_group[bounds[g] : bounds[g + 1]]]
            mem = [i for s in sig for i in member_by_space.get(s, [])]
            prods = sorted({self.members[i].owner for i in mem if self.members[i].kind == "out"})
            stats = any(sp in self.stat_spaces for sp in sig)
            heads = any(sp in self.head_spaces for sp in sig)
            self.groups.append(Group(gid, us, sig, mem, prods, stats, heads))

    # -- results -------------------------------------------------------------------------------------
    def units_of(self, member: Member) -> np.ndarray:
        """The unit of each index of ``member``'s parameter along its dim."""
        return self.labels[self.spaces[member.space].base + member.index_map]

    def locked_summary(self, limit: int = 50) -> list[dict[str, str]]:
        """Producer spaces that cannot be pruned and the first reason why."""
        out = []
        seen = set()
        for m in self.members:
            if m.kind != "out" or (m.owner, m.param) in seen:
                continue
            seen.add((m.owner, m.param))
            labs = unique(self.units_of(m))
            locked = labs[self.unit_locked[labs]]
            if len(locked):
                reason = self.unit_lock_reason.get(int(locked[0]), "locked")
                out.append({"layer": m.owner, "reason": reason})
        return out[:limit] if limit else out


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else ""


def _leaf(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return f"{node.op} {fn_name(node)}"
