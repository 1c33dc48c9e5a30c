"""Channel surgery: physically remove units of a :class:`~.analysis.ChannelAnalysis`.

:func:`remove_units` slices every member parameter / buffer along its dim, makes the touched
modules' size attributes agree (``out_channels``, ``groups`` of a depthwise conv, ``num_features``
...), swaps a sliced ``nn.MultiheadAttention`` for :class:`~graphopt.modules.SelfAttention` and
rewrites the graph's shape constants (reshape / view / expand / unflatten sizes, including the
integer factors of size products such as ``B * num_heads``, layer-norm shapes, channel-slice
bounds, split sizes). It refuses a removal that would leave a layer with no head or channel.
It returns the *plan entries*: per member, the indices removed along its dim.

A pruning plan (:func:`plan_document`: one list of entries per round) replays on a fresh instance
of the same architecture with :func:`apply_plan`, so a pruned checkpoint loads with
``load_state_dict``.
"""

from __future__ import annotations

import json
import operator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.errors import GraphoptError
from graphopt.graph import Graph, code_state, find_module, modules_by_path, node_meta
from graphopt.modules import SelfAttention, window_attention
from graphopt.optypes import CONV, CONV_T

from .analysis import ChannelAnalysis
from .records import Member, Rewrite
from .rules_shapes import int_factors

__all__ = [
    "PLAN_FORMAT",
    "apply_members",
    "apply_plan",
    "member_tensor",
    "plan_document",
    "remove_units",
]

PLAN_FORMAT = "graphopt-prune-plan"


def member_tensor(
    root: nn.Module, member: Member, modules: dict[str, nn.Module] | None = None
) -> torch.Tensor:
    """The parameter or buffer a member slices (``root``'s ``member.owner.member.param``);
    ``modules`` (:func:`~graphopt.graph.modules_by_path` of ``root``) spares the lookup."""
    if modules is None:
        return getattr(root.get_submodule(member.owner), member.param)
    return getattr(find_module(root, modules, member.owner), member.param)


def remove_units(
    graph: Graph, ca: ChannelAnalysis, units: np.ndarray, *, propagate: bool = True
) -> list[dict[str, Any]]:
    """Physically remove the given units (component labels of ``ca``); returns the plan
    entries (members and removed indices). ``propagate=False`` leaves the node shapes stale
    for a caller that propagates them itself (the pass manager does after every pass)."""
    units = np.asarray(units, dtype=np.int64)
    bad = units[~ca.unit_prunable[units]] if len(units) else units
    if len(bad):
        raise GraphoptError(f"prune: units {bad[:5].tolist()} are locked or produce nothing")
    _refuse_emptying(ca, units)
    removed = np.isin(ca.labels, units)
    members = _plan_members(ca, removed)
    apply_members(graph.module, members)
    code = code_state(graph.module.graph)
    _rewrite_nodes(ca, graph.module, removed)
    if code_state(graph.module.graph) != code:  # else only parameters shrank: same code
        graph.recompile()
    graph.invalidate()
    if propagate:
        graph.propagate_shapes()
    return members


def _refuse_emptying(ca: ChannelAnalysis, units: np.ndarray) -> None:
    """Refuse a removal that leaves some group with no unit: an attention layer with no head,
    a layer with no output channel."""
    for g in ca.groups:
        if len(g.units) and np.isin(g.units, units).all():
            what = "attention heads" if g.heads else "channels"
            raise GraphoptError(
                f"prune: removing all {g.size} {what} of {', '.join(g.producers)} would leave "
                f"the layer{'s' if len(g.producers) > 1 else ''} empty; keep at least one"
            )


def plan_document(rounds: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """A pruning plan (JSON-able) from the plan entries of each round, for :func:`apply_plan`."""
    return {
        "format": PLAN_FORMAT,
        "version": 1,
        "rounds": [{"round": i, "members": m} for i, m in enumerate(rounds, start=1)],
    }


def apply_plan(model: nn.Module, plan: dict[str, Any] | str | Path) -> nn.Module:
    """Replay a pruning plan on a fresh instance of the same architecture (in place).

    After this, ``model.load_state_dict(pruned_state_dict)`` loads the pruned checkpoint.
    Shape constants hard-coded in the model's Python ``forward`` are not rewritten (the traced
    Graph rewrites them); plans for models whose forward computes shapes dynamically replay
    exactly.
    """
    if isinstance(plan, (str, Path)):
        plan = json.loads(Path(plan).read_text())
    if plan.get("format") != PLAN_FORMAT:
        raise GraphoptError("apply_plan: not a graphopt pruning plan (missing format field)")
    for rnd in plan["rounds"]:
        for e in rnd["members"]:
            try:
                mod = model.get_submodule(e["owner"]) if e["owner"] else model
            except AttributeError as err:
                raise GraphoptError(
                    f"apply_plan: the model has no module {e['owner']!r}; is it the same architecture?"
                ) from err
            if not isinstance(getattr(mod, e["param"], None), torch.Tensor):
                name = f"{e['owner']}.{e['param']}" if e["owner"] else e["param"]
                raise GraphoptError(
                    f"apply_plan: the plan prunes {name!r}, which this model does not have: the "
                    "plan was made on a graph that earlier passes changed (fold-bn gives a conv "
                    "the bias of the BatchNorm it absorbs). Run those passes first, e.g. "
                    "graphopt.compress(model, 'fold-bn', example_inputs=x).graph.module, and "
                    "apply the plan to that"
                )
        apply_members(model, rnd["members"])
    return model


def apply_members(root: nn.Module, members: list[dict[str, Any]]) -> list[str]:
    """Slice the listed parameters of ``root`` and fix the touched modules' attributes."""
    depthwise = {}
    attention: dict[str, int] = {}
    found = modules_by_path(root)
    mods = {o: find_module(root, found, o) for o in dict.fromkeys(e["owner"] for e in members)}
    for owner, mod in mods.items():
        depthwise[owner] = _is_depthwise(mod)
        if isinstance(mod, nn.MultiheadAttention):
            attention[owner] = mod.head_dim
    touched = []
    sliced: dict[tuple[str, str], torch.Tensor] = {}  # a tensor sliced along several dims
    for e in members:
        mod = mods[e["owner"]]
        key = (e["owner"], e["param"])
        t = sliced[key] if key in sliced else getattr(mod, e["param"]).detach()
        n, drop = t.shape[e["dim"]], np.asarray(e["removed"], dtype=np.int64)
        if len(drop) and (drop.min() < 0 or drop.max() >= n):
            raise GraphoptError(
                f"prune: {e['owner'] or 'the model'}.{e['param']} has {n} slices along dim "
                f"{e['dim']}; the plan removes indices outside 0..{n - 1}"
            )
        keep = np.ones(n, dtype=bool)
        keep[drop] = False
        sliced[key] = t.index_select(e["dim"], torch.from_numpy(np.flatnonzero(keep)))
        touched.append(e["owner"])
    for (owner, param), t in sliced.items():  # one new Parameter per tensor, not per dim
        _set_tensor(mods[owner], param, t)
    for owner in dict.fromkeys(touched):
        _fix_attributes(mods[owner], depthwise[owner])
    for owner, head_dim in attention.items():
        _to_self_attention(root, owner, head_dim)
    _fix_split_sizes(root, touched)
    return list(dict.fromkeys(touched))


def _fix_split_sizes(root: nn.Module, touched: list[str]) -> None:
    """Hugging Face GPT-2 style attention splits its packed ``c_attn`` output (q, k, v; k, v
    under cross-attention) with a Python attribute ``split_size``: make it follow the pruned
    width, and ``num_heads`` the heads left (the eager forward reshapes with ``-1`` heads)."""
    for owner in dict.fromkeys(touched):
        path, _, leaf = owner.rpartition(".")
        if leaf != "c_attn":
            continue
        parent = root.get_submodule(path) if path else root
        packed = getattr(parent, "c_attn", None)
        if not hasattr(parent, "split_size") or not hasattr(packed, "nf"):
            continue
        parts = 2 if getattr(parent, "is_cross_attention", False) else 3
        parent.split_size = packed.nf // parts
        head_dim = getattr(parent, "head_dim", 0)
        if head_dim and hasattr(parent, "num_heads"):
            parent.num_heads = parent.split_size // head_dim


# -- parameters ---------------------------------------------------------------------------------------
def _plan_members(ca: ChannelAnalysis, removed: np.ndarray) -> list[dict[str, Any]]:
    """For each member touched by ``removed`` (bool per element): the indices to drop."""
    out = []
    seen: set[tuple[str, str, int]] = set()
    for m in ca.members:
        sp = ca.spaces[m.space]
        drop = np.nonzero(removed[sp.base + m.index_map])[0]
        key = (m.owner, m.param, m.dim)
        if len(drop) == 0 or key in seen:
            continue
        seen.add(key)
        out.append({"owner": m.owner, "param": m.param, "dim": m.dim, "removed": drop.tolist()})
    return out


def _set_tensor(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    elif name in getattr(mod, "_buffers", {}):
        mod._buffers[name] = value.contiguous()
    else:
        setattr(mod, name, value.contiguous())


def _fix_attributes(mod: nn.Module, depthwise: bool = False) -> None:
    """Make a module's size attributes agree with its (sliced) parameters."""
    if isinstance(mod, CONV):
        out_g = mod.out_channels // mod.groups
        mod.out_channels = mod.weight.shape[0]
        if depthwise:
            mod.groups = mod.out_channels // out_g
        mod.in_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, CONV_T):
        mod.in_channels = mod.weight.shape[0]
        mod.out_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        ref = mod.weight if mod.weight is not None else mod.running_mean
        if ref is not None:
            mod.num_features = ref.shape[0]
    elif isinstance(mod, nn.GroupNorm):
        if mod.weight is not None:
            mod.num_channels = mod.weight.shape[0]
    elif isinstance(mod, nn.LayerNorm):
        if mod.weight is not None:
            mod.normalized_shape = (mod.weight.shape[0],)
    elif isinstance(mod, nn.PReLU):
        mod.num_parameters = mod.weight.shape[0]
    elif isinstance(mod, nn.Embedding):
        mod.embedding_dim = mod.weight.shape[1]
    elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # Hugging Face's, W: [in, out]
        mod.nx, mod.nf = mod.weight.shape


def _is_depthwise(mod: nn.Module) -> bool:
    return isinstance(mod, CONV) and mod.groups > 1 and mod.in_channels == mod.groups


def _to_self_attention(root: nn.Module, path: str, head_dim: int) -> None:
    """Swap a sliced ``nn.MultiheadAttention`` for :class:`SelfAttention` (free widths)."""
    mod = root.get_submodule(path)
    if not isinstance(mod, nn.MultiheadAttention):
        if isinstance(mod, SelfAttention):
            mod.embed_in = mod.in_proj_weight.shape[1]
            mod.embed_out = mod.out_proj.weight.shape[0]
            mod.num_heads = mod.in_proj_weight.shape[0] // 3 // mod.head_dim
        return
    new = SelfAttention.from_mha(mod, head_dim)
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


# -- shape constants ----------------------------------------------------------------------------------
def _space_new_sizes(ca: ChannelAnalysis, removed: np.ndarray) -> dict[int, int]:
    return {s.id: int(s.size - removed[s.base : s.base + s.size].sum()) for s in ca.spaces}


def _new_shape(
    ca: ChannelAnalysis, node_name: str, new_sizes: dict[int, int], out: int = 0
) -> list[int]:
    return [new_sizes[s.id] for s in ca.layout.get((node_name, out), [])]


def _rewrite_nodes(ca: ChannelAnalysis, gm: fx.GraphModule, removed: np.ndarray) -> None:
    """Recompute the shape arguments of reshape / expand / unflatten / layer_norm / slice /
    split nodes."""
    new_sizes = _space_new_sizes(ca, removed)
    nodes = {n.name: n for n in gm.graph.nodes}
    scaled: dict[tuple[fx.Node, Fraction], fx.Node] = {}
    for rw in ca.rewrites:
        node = nodes.get(rw.node)
        if node is None:
            continue
        if rw.kind == "reshape":
            new, old = _new_shape(ca, node.name, new_sizes), ca.layout_shape(node.name)
            _rewrite_reshape(gm.graph, node, new, old, ca.size_modes, scaled)
        elif rw.kind == "shape_tail":  # x.size()[:k] + (n, ...): the constant tail
            value, k = nodes[rw.info["value"]], rw.info["k"]
            value.args = (value.args[0], tuple(_new_shape(ca, node.name, new_sizes)[k:]))
        elif rw.kind == "unflatten":
            new = _new_shape(ca, node.name, new_sizes)
            x, dim, sizes = node.args[:3]
            dim = dim % (len(new) - len(sizes) + 1)  # of the input
            fixed = [new[dim + i] if v != -1 else v for i, v in enumerate(sizes)]
            node.args = (x, dim, fixed, *node.args[3:])
        elif rw.kind == "layer_norm":
            shape = _new_shape(ca, node.name, new_sizes)
            args = list(node.args)
            if len(args) > 1:
                args[1] = (shape[-1],)
                node.args = tuple(args)
            else:
                node.kwargs = {**node.kwargs, "normalized_shape": (shape[-1],)}
        elif rw.kind == "slice":
            _rewrite_slice(node, rw, removed[ca.spaces[rw.info["space"]].elements()])
        elif rw.kind == "aten_slice":
            start, kept = _slice_bounds(rw, removed[ca.spaces[rw.info["space"]].elements()])
            node.args = (*node.args[:2], start, start + kept, *node.args[4:])
        elif rw.kind == "attention":
            _to_self_attention(gm, rw.info["path"], rw.info["head_dim"])
        elif rw.kind == "window_attention":  # Swin: the head width becomes an argument
            d = rw.info["head_dim"]
            heads = gm.get_parameter(rw.info["qkv"]).shape[0] // 3 // d
            args = list(node.args)
            args[5] = heads
            node.target = window_attention
            node.args = tuple(args)
            node.kwargs = {**node.kwargs, "head_dim": d}
        elif rw.kind == "split":
            dim = rw.info["dim"]
            sizes = [
                _new_shape(ca, node.name, new_sizes, k)[dim]
                for k in range(len(node_meta(node).outputs))
            ]
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(torch.split, (node.args[0], sizes), {"dim": dim})
            new.meta = node.meta
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)


def _rewrite_reshape(
    graph: fx.Graph,
    node: fx.Node,
    shape: list[int],
    old: tuple[int, ...],
    modes: dict[tuple[str, int], str],
    cache: dict[tuple[fx.Node, Fraction], fx.Node],
) -> None:
    """Put the pruned sizes into a reshape / view / expand's size arguments: constants are
    replaced (``-1`` kept); a size computed in the graph is left to follow the pruning at run
    time, or has its integer factor rescaled (``B * 4`` -> ``B * 2``) or is replaced by the new
    constant, as the analysis decided (:meth:`~.analysis.ChannelAnalysis._size_pairs`)."""
    if shape == list(old):
        return
    args = list(node.args)
    packed = len(args) == 2 and isinstance(args[1], (list, tuple))  # x.view((a, b)) form
    vals = list(args[1]) if packed else args[1:]
    fixed = []
    for i, v in enumerate(vals):
        if i >= len(shape) or shape[i] == old[i] or (isinstance(v, int) and v == -1):
            fixed.append(v)
        elif isinstance(v, int):
            fixed.append(shape[i])
        elif modes.get((node.name, i)) == "rescale":
            key = (v, Fraction(shape[i], old[i]))
            if key not in cache:  # q, k and v views share one size product
                with graph.inserting_before(node):
                    cache[key] = _rescaled(graph, v, key[1], node.name)
            fixed.append(cache[key])
        elif modes.get((node.name, i)) == "constant":
            fixed.append(shape[i])
        else:
            fixed.append(v)
    if node.op == "call_method" and not packed:
        node.args = (args[0], *fixed)
    else:
        node.args = (
            args[0],
            type(args[1])(fixed) if isinstance(args[1], (list, tuple)) else fixed,
        )
    for v in vals:
        _erase_unused_muls(graph, v)


def _erase_unused_muls(graph: fx.Graph, v: Any) -> None:
    if isinstance(v, fx.Node) and v.target is operator.mul and not v.users:
        graph.erase_node(v)
        for a in v.args:
            _erase_unused_muls(graph, a)


def _rescaled(graph: fx.Graph, v: fx.Node, factor: Fraction, where: str) -> fx.Node:
    """A copy of the size product ``v`` with one integer factor ``c`` replaced by
    ``c · factor`` (the first for which that is an integer); the nodes it shares stay."""
    for mul, pos in int_factors(v):
        scaled = Fraction(mul.args[pos]) * factor
        if scaled.denominator != 1:
            continue
        path = [mul]  # from the factor's mul node up to v
        while path[-1] is not v:
            path.append(next(u for u in path[-1].users if u in _mul_nodes(v)))
        new: Any = int(scaled)
        old: Any = None
        for k, n in enumerate(path):
            args = list(n.args)
            if k == 0:
                args[pos] = new
            else:
                args[args.index(old)] = new
            old = n
            new = graph.call_function(n.target, tuple(args), dict(n.kwargs))
        return new
    raise GraphoptError(f"prune: cannot rescale the size argument {v.name} of {where} by {factor}")


def _mul_nodes(v: fx.Node) -> set[fx.Node]:
    found = {v}
    for a in v.args:
        if isinstance(a, fx.Node) and a.op == "call_function" and a.target is operator.mul:
            found |= _mul_nodes(a)
    return found


def _slice_bounds(rw: Rewrite, gone: np.ndarray) -> tuple[int, int]:
    """The start and length of a channel slice once ``gone`` (bool per channel) are removed."""
    start = rw.info["start"] - int(gone[: rw.info["start"]].sum())
    kept = rw.info["n"] - int(gone[rw.info["start"] : rw.info["start"] + rw.info["n"]].sum())
    return start, kept


def _rewrite_slice(node: fx.Node, rw: Rewrite, gone: np.ndarray) -> None:
    """Move a channel slice's bounds past the removed channels (``gone``: bool per channel)."""
    start, kept = _slice_bounds(rw, gone)
    src, idx = node.args
    items = list(idx) if isinstance(idx, tuple) else [idx]
    items[rw.info["pos"]] = slice(start, start + kept)
    node.args = (src, tuple(items) if isinstance(idx, tuple) else items[0])
