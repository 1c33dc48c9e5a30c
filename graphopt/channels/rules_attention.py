"""Channel rules for attention: ``F.scaled_dot_product_attention``, batched matmuls (``q @ kᵀ``,
``attn @ v``) and ``repeat_interleave`` (grouped-query attention), plus the look-ahead that tells
a reshape which of its dims becomes a head axis (or the channel axis of a layer).

A head is a unit like any channel: the rows ``h·D ... h·D + D - 1`` of the q, k and v
projections and the same columns of the output projection. The reshape that splits the
projection width ``[.., H·D] -> [.., H, D]`` prunes along ``H`` when ``H`` reaches the head axis
of an attention product (see :meth:`~.rules_shapes.ShapeRules._regroup`), so head ``h`` of q is
the set of its ``D`` rows and ``D`` is kept whole. The products then couple exactly what they
couple:

- ``softmax(q kᵀ · s + mask) v`` over ``q: [.., Hq, L, E]``, ``k: [.., Hk, S, E]``,
  ``v: [.., Hk, S, Ev]``: head ``h`` of q, k, v and of the output are one unit (grouped-query
  attention, ``enable_gqa``: query head ``h`` reads key/value head ``h // (Hq/Hk)``, so
  removing a key/value head removes its whole query group); ``q_e`` and ``k_e`` pair in the dot
  product (element ``e`` of both can go together, unless the default scale ``1/√E`` reads
  ``E``: then it is locked); ``v``'s width is the output's; the mask broadcasts against
  ``[.., Hq, L, S]``;
- ``a @ b`` with ``a: [.., n, k]``, ``b: [.., k, m]``: batch dims broadcast, ``a_k`` pairs with
  ``b_k``, rows follow ``a`` and columns follow ``b``;
- ``repeat_interleave(x, g, dim)``: output index ``j`` is input index ``j // g``.

Heads of one layer form one group (marked :attr:`~.records.Group.heads`), ranked and removed
whole; ``nn.MultiheadAttention`` called as a module is the module rule's business
(:mod:`.rules_modules`), its exported form (``aten.linear`` on ``in_proj_weight``, ``[T, B·H, D]``
views) goes through these rules like any hand-written attention.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.graph import Graph
from graphopt.optypes import BATCHNORM, CONV, CONV_T, INSTANCENORM

from .coupling import Coupling
from .records import Rewrite
from .rules_shapes import _reshape_groups

aten = torch.ops.aten

SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
MATMUL = {torch.matmul, operator.matmul, torch.bmm, aten.matmul.default, aten.bmm.default}
REPEAT_INTERLEAVE = {torch.repeat_interleave, aten.repeat_interleave.self_int}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_PERMUTES = {torch.transpose, torch.swapaxes, torch.permute, "transpose", "swapaxes", "permute"}
_RESHAPES = {
    "view",
    "reshape",
    torch.reshape,
    aten.unflatten.int,
    "unflatten",
    torch.flatten,
    "flatten",
}
_WINDOW_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias")
SWIN_FUNCTIONS = {
    ("torchvision.models.swin_transformer", "shifted_window_attention"): "_window_attention",
    ("graphopt.modules", "window_attention"): "_window_attention",
    (
        "torchvision.models.swin_transformer",
        "_get_relative_position_bias",
    ): "_relative_position_bias",
    ("torchvision.models.swin_transformer", "_patch_merging_pad"): "_patch_merging_pad",
}
"""Functions Swin calls opaquely under fx (``torch.fx.wrap``): rule method by (module, name)."""
_HEAD = -1  # look-ahead verdict: the followed dim is an attention head axis
_CHANNEL_MODULES = CONV + CONV_T + BATCHNORM + INSTANCENORM + (nn.GroupNorm,)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


class AttentionRules(Coupling):
    """The attention rules (a mixin of :class:`~.analysis.ChannelAnalysis`)."""

    def __init__(self, graph: Graph):
        super().__init__(graph)
        self._heads_memo: dict[tuple[str, int], bool] = {}
        self._channels_memo: dict[tuple[str, int], bool] = {}

    def _sdpa(self, node: fx.Node) -> bool:
        q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
        mask = _arg(node, 3, "attn_mask")
        scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
        gqa = bool(node.kwargs.get("enable_gqa", False))
        shapes = [self._shape(t) for t in (q, k, v, node)]
        if any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1:
            return False
        r = len(shapes[0])
        if r < 3:
            return False
        sq, sk, sv, so = (self.spaces_of(t) for t in (q, k, v, node))
        for d in range(r - 3):  # batch dims (broadcast)
            for s in (sq[d], sk[d], sv[d]):
                if not (s.size == 1 and so[d].size != 1) and not self.couple_spaces(s, so[d]):
                    self.lock(s, f"{node.name}: attention batch dim {d}")
        h = r - 3
        hq, hk = sq[h].size, sk[h].size
        self.couple_spaces(sq[h], so[h])
        if hq == hk and self.couple_spaces(sk[h], sv[h]):
            self.couple_spaces(sq[h], sk[h])
        elif gqa and hk and hq % hk == 0 and self.couple_spaces(sk[h], sv[h]):
            j = np.arange(hq)
            self.couple(sq[h].base + j, sk[h].base + j // (hq // hk))
        else:
            for s in (sq[h], sk[h], sv[h]):
                self.lock(s, f"{node.name}: {hq} query heads and {hk} key/value heads")
        self.head_spaces.update(s.id for s in (sq[h], sk[h], sv[h], so[h]))
        self.couple_spaces(sq[r - 2], so[r - 2])
        if not self.couple_spaces(sk[r - 2], sv[r - 2]):
            self._lock_all(node, f"{node.name}: keys and values of different lengths")
        if scale is None:
            for s in (sq[r - 1], sk[r - 1]):
                self.lock(s, f"{node.name}: the default scale 1/sqrt(E) reads the head width")
        elif not self.couple_spaces(sq[r - 1], sk[r - 1]):
            self._lock_all(node, f"{node.name}: q and k widths differ")
        self.couple_spaces(sv[r - 1], so[r - 1])
        if isinstance(mask, fx.Node):
            self._broadcast_onto(node, mask, [*so[:-1], sk[r - 2]])
        return True

    def _window_attention(self, node: fx.Node) -> bool:
        """Swin's ``shifted_window_attention(x, W_qkv, W_proj, bias, window, heads, ...)`` (and
        :func:`graphopt.modules.window_attention`, what it becomes once pruned) on ``x: [B, H,
        W, C]``: ``C`` is consumed by ``W_qkv``'s columns, the output width produced by
        ``W_proj``'s rows; a virtual head space (the rows of q, k and v in ``W_qkv``, the
        columns of ``W_proj``, dim 1 of the relative position bias, V2's logit scale) is
        coupled head-wise; H and W are locked (windows mix tokens)."""
        x, w_qkv, w_proj, bias = (_arg(node, i, n) for i, n in enumerate(_WINDOW_ARGS))
        heads_n = _arg(node, 5, "num_heads")
        b_qkv, b_proj, scale = (
            _arg(node, i, n) for i, n in ((9, "qkv_bias"), (10, "proj_bias"), (11, "logit_scale"))
        )
        params = [w_qkv, w_proj] + [p for p in (b_qkv, b_proj, scale) if p is not None]
        shape = self._shape(x)
        if (
            not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params)
            or not isinstance(heads_n, int)
            or not isinstance(bias, fx.Node)
            or shape is None
            or len(shape) != 4
        ):
            return False
        inner = self._shape(w_qkv)[0] // 3
        head_dim = _arg(node, 13, "head_dim", 0) or shape[3] // heads_n
        sb = self.spaces_of(bias)
        if inner != heads_n * head_dim or len(sb) != 4 or sb[1].size != heads_n:
            return False  # checked before any coupling: "not understood" locks it all
        in_s, out_s = self.space_at(x, 3), self.space_at(node, 3)
        self.passthrough_dims(node, x, {0: 0}, consumed=(3,), produced=(3,))
        for d in (1, 2):
            self.lock(self.space_at(x, d), f"{node.name}: windows mix tokens")
        heads = self._new_space(f"{node.name}#heads", 0, (0,), (inner,), 0)
        self.head_spaces.add(heads.id)
        j = np.arange(inner)
        self.couple(heads.base + j, heads.base + (j // head_dim) * head_dim)
        first = heads.base + np.arange(heads_n) * head_dim  # an element of each head
        qkv_out, qkv_in = self.spaces_of(w_qkv)
        self.couple_spaces(qkv_in, in_s)
        self.couple(qkv_out.base + np.arange(3 * inner), heads.base + np.tile(j, 3))
        proj_out, proj_in = self.spaces_of(w_proj)
        self.couple_spaces(proj_out, out_s)
        self.couple(proj_in.base + j, heads.base + j)
        owner, _, name = str(w_qkv.target).rpartition(".")
        self.member(owner, name, 1, in_s, np.arange(in_s.size), "in")
        self.member(owner, name, 0, heads, np.tile(j, 3), "out")
        owner, _, name = str(w_proj.target).rpartition(".")
        self.member(owner, name, 1, heads, j, "in")
        self.member(owner, name, 0, out_s, np.arange(out_s.size), "out")
        if b_qkv is not None:
            s = self.spaces_of(b_qkv)[0]
            self.couple(s.base + np.arange(3 * inner), heads.base + np.tile(j, 3))
        if b_proj is not None:
            self.couple_spaces(self.spaces_of(b_proj)[0], out_s)
        if scale is not None:
            s = self.spaces_of(scale)
            self.couple(s[0].base + np.arange(heads_n), first)
        self.couple(sb[1].base + np.arange(heads_n), first)
        for sp in (sb[0], sb[2], sb[3]):
            if sp.size != 1:
                self.lock(sp, f"{node.name}: relative position bias tokens")
        self.rewrites.append(
            Rewrite(node.name, "window_attention", {"head_dim": head_dim, "qkv": str(w_qkv.target)})
        )
        return True

    def _relative_position_bias(self, node: fx.Node) -> bool:
        """Swin's ``_get_relative_position_bias(table, index, window)``: ``table: [T, heads]``
        gathered by ``index`` into ``[1, heads, N, N]``; the heads pass, the rest is locked."""
        table, index = node.args[0], node.args[1]
        st, so = self.spaces_of(table), self.spaces_of(node)
        if len(st) != 2 or len(so) != 4 or not self.couple_spaces(st[1], so[1]):
            return False
        self.lock(st[0], f"{node.name}: gathered by the relative position index")
        for sp in (so[0], so[2], so[3]):
            self.lock(sp, f"{node.name}: relative position bias tokens")
        if isinstance(index, fx.Node):
            self._lock_all(index, f"{node.name}: relative position index")
        return True

    def _patch_merging_pad(self, node: fx.Node) -> bool:
        """Swin's ``_patch_merging_pad(x)``: ``[.., H, W, C] -> [.., H/2, W/2, 4C]``, the four
        2x2 neighbours concatenated on the channel dim (output channel ``k·C + c`` is input
        channel ``c``)."""
        x = node.args[0]
        shape = self._shape(x)
        if shape is None or len(shape) < 3:
            return False
        nd = len(shape)
        si, so = self.space_at(x, nd - 1), self.space_at(node, nd - 1)
        if si is None or so is None or so.size != 4 * si.size:
            return False
        tail = (nd - 3, nd - 2, nd - 1)
        self.passthrough_dims(node, x, {d: d for d in range(nd - 3)}, consumed=tail, produced=tail)
        for t in (x, node):
            for d in (nd - 3, nd - 2):
                self.lock(self.space_at(t, d), f"{node.name}: patch merging")
        k = np.arange(so.size)
        self.couple(so.base + k, si.base + k % si.size)
        return True

    def _broadcast_onto(self, node: fx.Node, t: fx.Node, target: list) -> None:
        """Couple ``t``'s dims right-aligned with the ``target`` spaces (size-1 broadcasts)."""
        spaces = self.spaces_of(t)
        for s, ref in zip(reversed(spaces), reversed(target)):
            if s.size == 1 and ref.size != 1:
                continue
            if not self.couple_spaces(s, ref):
                self.lock(s, f"{node.name}: mask layout")
        for s in spaces[: max(0, len(spaces) - len(target))]:
            self.lock(s, f"{node.name}: mask layout")

    def _matmul(self, node: fx.Node, a: Any, b: Any) -> bool:
        shape_a, shape_b, shape_o = self._shape(a), self._shape(b), self._shape(node)
        if None in (shape_a, shape_b, shape_o) or len(shape_a) < 2 or len(shape_b) < 2:
            return False
        sa, sb, so = self.spaces_of(a), self.spaces_of(b), self.spaces_of(node)
        n = len(shape_o)
        self.couple_spaces(sa[-2], so[-2])
        self.couple_spaces(sb[-1], so[-1])
        if not self.couple_spaces(sa[-1], sb[-2]):
            return False
        fed = set()
        for spaces in (sa, sb):
            off = n - len(spaces)
            for s in spaces[:-2]:
                t = so[s.dims[0] + off]
                if s.size == 1 and t.size != 1:
                    continue
                if self.couple_spaces(s, t):
                    fed.add(t.id)
                else:
                    self.lock(s, f"{node.name}: matmul batch layout")
        for t in so[:-2]:
            if t.id not in fed:
                self.lock(t, f"{node.name}: matmul batch dim {t.dims[0]} not from an input")
        if n >= 3:
            self.head_spaces.update(s[-3].id for s in (sa, sb, so) if len(s) >= 3)
        return True

    def _repeat_interleave(self, node: fx.Node) -> bool:
        x, reps, dim = node.args[0], _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        if not isinstance(reps, int) or dim is None:
            return False
        nd = len(self._shape(x))
        dim = dim % nd
        self.passthrough_dims(
            node, x, {d: d for d in range(nd) if d != dim}, consumed=(dim,), produced=(dim,)
        )
        s, t = self.space_at(x, dim), self.space_at(node, dim)
        j = np.arange(t.size)
        self.couple(t.base + j, s.base + j // reps)
        return True

    # -- look-ahead ----------------------------------------------------------------------------------
    def _reaches_heads(self, node: fx.Node, dim: int, depth: int = 0) -> bool:
        """Whether output dim ``dim`` of ``node`` becomes the head axis (dim ``-3``) of an
        attention product, following it through transposes, permutes, squeezes, selects,
        reshapes (into every dim of its group) and shape-preserving ops."""
        memo = self._heads_memo
        key = (node.name, dim)
        if key not in memo:
            memo[key] = False  # a cycle guard while it is computed
            found = depth < 16 and any(
                d == _HEAD or self._reaches_heads(user, d, depth + 1)
                for user in node.users
                for d in self._follow(user, node, dim)
            )
            memo[key] = found
        return memo[key]

    def _reaches_channels(self, node: fx.Node, dim: int, depth: int = 0) -> bool:
        """Whether output dim ``dim`` of ``node`` becomes the channel axis a layer reads (dim 1
        of a conv, conv-transpose or batch / instance / group norm module, the last dim of a
        linear), followed like :meth:`_reaches_heads` and through elementwise modules."""
        memo = self._channels_memo
        key = (node.name, dim)
        if key not in memo:
            memo[key] = False  # a cycle guard while it is computed
            found = False
            for user in node.users if depth < 16 else ():
                if user.op == "call_module":
                    mod = self.module(str(user.target))
                    if not user.args or user.args[0] is not node:
                        continue
                    r = len(self._shape(node) or ())
                    if isinstance(mod, _CHANNEL_MODULES) and dim == 1:
                        found = True
                    elif isinstance(mod, nn.Linear) and dim == r - 1:
                        found = True
                    elif isinstance(mod, self._unary_modules):
                        found = self._reaches_channels(user, dim, depth + 1)
                else:
                    found = any(
                        d != _HEAD and self._reaches_channels(user, d, depth + 1)
                        for d in self._follow(user, node, dim)
                    )
                if found:
                    break
            memo[key] = found
        return memo[key]

    def _follow(self, user: fx.Node, src: fx.Node, dim: int) -> list[int]:
        """Where dim ``dim`` of ``src`` lands in ``user``'s output (``_HEAD``: an attention
        head axis)."""
        shape, out = self._shape(src), self._shape(user)
        if shape is None or user.op not in ("call_function", "call_method"):
            return []
        t, a = user.target, user.args
        r = len(shape)
        if t in SDPA:
            return [_HEAD] if src in a[:3] and dim == r - 3 else []
        if t in MATMUL or t in _MATMUL_METHODS:
            return [_HEAD] if r >= 3 and dim == r - 3 else []
        if out is None or not a or a[0] is not src:
            return []
        if t in _PERMUTES:
            perm = _permutation(user, r)
            return [perm.index(dim)] if perm else []
        if t in _RESHAPES:
            for gi, go in _reshape_groups(shape, out) or []:
                if dim in gi:
                    return list(go)
            return []
        if t in (aten.select.int, "select"):
            sel = a[1] % r
            return [] if sel == dim else [dim - (dim > sel)]
        if t in (torch.squeeze, "squeeze"):
            sq = _arg(user, 1, "dim")
            dims = range(r) if sq is None else sq if isinstance(sq, (list, tuple)) else [sq]
            gone = {d % r for d in dims if shape[d % r] == 1}
            return [] if dim in gone else [dim - sum(g < dim for g in gone)]
        if t in (torch.unsqueeze, "unsqueeze"):
            return [dim + (dim >= a[1] % (r + 1))]
        if t is operator.getitem:
            return _getitem_dim(a[1], r, dim)
        if len(out) == r:
            return [dim]
        return []


def _permutation(node: fx.Node, r: int) -> list[int] | None:
    """The permutation of a transpose / permute call (output dim -> input dim)."""
    a = node.args
    if node.target in (torch.transpose, torch.swapaxes, "transpose", "swapaxes"):
        d0, d1 = a[1] % r, a[2] % r
        perm = list(range(r))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    dims = a[1] if len(a) == 2 and isinstance(a[1], (list, tuple)) else a[1:]
    if all(isinstance(d, int) for d in dims) and len(dims) == r:
        return [d % r for d in dims]
    return None


def _getitem_dim(idx: Any, r: int, dim: int) -> list[int]:
    """Where dim ``dim`` lands through ``x[idx]`` (basic indexing only)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    if not all(it is None or it is Ellipsis or isinstance(it, (int, slice)) for it in items):
        return []
    d_in = d_out = 0
    for it in items:
        if it is Ellipsis:
            n = r - sum(1 for x in items if x is not None and x is not Ellipsis)
            if d_in <= dim < d_in + n:
                return [d_out + dim - d_in]
            d_in, d_out = d_in + n, d_out + n
        elif it is None:
            d_out += 1
        elif isinstance(it, int):
            if d_in == dim:
                return []
            d_in += 1
        else:
            if d_in == dim:
                return [d_out]
            d_in, d_out = d_in + 1, d_out + 1
    return [d_out + dim - d_in] if dim >= d_in else []
