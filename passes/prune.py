"""``prune``: structured channel pruning with dependency propagation.

The channel analysis (:mod:`graphopt.channels`) splits the graph's channels into *units* (one
channel, coupled across every tensor and parameter it touches) and *groups* (units touching
the same spaces). For each group the pass scores every unit, removes the lowest-scoring
``ratio`` of them and physically slices every member parameter, so the layers shrink.

Importance of unit ``u`` in a group with members ``m`` (parameter slices along their pruned
dim): ``l1``: ``s_m(u) = Σ|w|``; ``l2``: ``s_m(u) = Σ w²``; ``bn-scale``: ``|γ|`` of the norm
layers in the group (groups without one are left whole); ``taylor``: ``Σ|w · ∂L/∂w|`` summed
over the data batches (``L`` is the cross-entropy with the labels, or with the model's own
predictions when the batches carry none); ``random``. Member scores are combined with
``reduce`` (mean, sum or max). ``scope=global`` ranks units of all groups together after
dividing each group's scores by their mean. ``target=macs:F`` / ``params:F`` searches the
ratio (bisection) until the pruned cost is within 2% of ``F`` times the original.

The pass writes a pruning plan (``prune_plan.json`` in the run's output dir): for every
member the indices removed along its dim. :func:`apply_plan` replays it on a fresh instance of
the same architecture so a pruned checkpoint loads with ``load_state_dict``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.atomic import write_json
from graphopt.channels import ChannelAnalysis
from graphopt.errors import DataError, GraphoptError, OptionError
from graphopt.graph import Graph, node_meta
from graphopt.modules import SelfAttention
from graphopt.pass_api import Pass, PassContext, PassResult
from graphopt.pipeline_text import parse_items

log = logging.getLogger(__name__)

Importance = Literal["l1", "l2", "bn-scale", "taylor", "random"]


@dataclass(frozen=True)
class PruneOptions:
    ratio: float = field(
        default=0.5, metadata={"help": "fraction of units removed per group, in [0, 1)"}
    )
    target: str | None = field(
        default=None,
        metadata={"help": "macs:F or params:F: search the ratio to keep F of the original"},
    )
    importance: Importance = field(default="l2", metadata={"help": "unit importance criterion"})
    reduce: Literal["mean", "sum", "max"] = field(
        default="mean", metadata={"help": "how member scores combine into a unit score"}
    )
    scope: Literal["local", "global"] = field(
        default="local", metadata={"help": "rank within each group, or across all groups"}
    )
    max_ratio: float = field(
        default=0.9, metadata={"help": "never remove more than this fraction of a group"}
    )
    round_to: int = field(default=1, metadata={"help": "keep unit counts a multiple of N"})
    ignore: tuple[str, ...] = field(default=(), metadata={"help": "module-path globs never pruned"})
    steps: int = field(
        default=1, metadata={"help": "iterative pruning in N rounds of increasing ratio"}
    )
    between: str | None = field(
        default=None,
        metadata={
            "help": 'pipeline run between rounds, e.g. "distill(epochs=2)" (with steps)',
            "pipeline": True,
        },
    )
    batches: int = field(default=4, metadata={"help": "data batches used by taylor importance"})
    seed: int = field(default=0, metadata={"help": "seed for random importance"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise OptionError(f"prune: ratio must be in [0, 1), got {self.ratio}")
        if not 0.0 < self.max_ratio < 1.0:
            raise OptionError(f"prune: max-ratio must be in (0, 1), got {self.max_ratio}")
        if self.round_to < 1:
            raise OptionError(f"prune: round-to must be >= 1, got {self.round_to}")
        if self.steps < 1:
            raise OptionError(f"prune: steps must be >= 1, got {self.steps}")
        if self.target is not None:
            parse_target(self.target)
        if self.between is not None:
            if self.steps < 2:
                raise OptionError("prune: between needs steps >= 2 (it runs between rounds)")
            parse_items(self.between)  # syntax; the manager checks the pass names


def parse_target(text: str) -> tuple[str, float]:
    kind, _, value = text.partition(":")
    try:
        frac = float(value)
    except ValueError:
        frac = -1.0
    if kind not in ("macs", "params") or not 0.0 < frac <= 1.0:
        raise OptionError(
            f"prune: target must be macs:F or params:F with 0 < F <= 1 (fraction kept), got {text!r}"
        )
    return kind, frac


def _run_between(graph: Graph, ctx: PassContext, text: str, step: int) -> dict[str, Any]:
    """Run the ``between`` pipeline (e.g. distillation) on the graph after round ``step``."""
    log.info("prune: running %s after round %d", text, step)
    result = ctx.run_nested(text, graph)
    return {"after_round": step, "passes": [r.to_dict() for r in result.reports]}


# -- importance -------------------------------------------------------------------------------------
def _member_tensor(gm: fx.GraphModule, owner: str, param: str) -> torch.Tensor:
    mod = gm.get_submodule(owner) if owner else gm
    return getattr(mod, param)


def _slice_scores(t: torch.Tensor, dim: int, p: int) -> np.ndarray:
    """``Σ|x|^p`` over each slice of ``t`` along ``dim``."""
    x = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1)
    s = x.abs().sum(1) if p == 1 else x.square().sum(1)
    return s.double().numpy()


def unit_scores(
    ca: ChannelAnalysis, importance: str, reduce: str, grads: dict | None = None, seed: int = 0
) -> np.ndarray:
    """A score per unit (NaN where the criterion has no opinion)."""
    n = ca.n_units
    if importance == "random":
        return np.random.default_rng(seed).random(n)
    total = np.zeros(n)
    count = np.zeros(n)
    best = np.full(n, -np.inf)
    gm = ca.gm
    for m in ca.members:
        if importance == "bn-scale":
            if not (m.kind == "norm" and m.param == "weight"):
                continue
        elif m.kind not in ("out", "in"):
            continue
        t = _member_tensor(gm, m.owner, m.param)
        if importance == "l1":
            s = _slice_scores(t, m.dim, 1)
        elif importance in ("l2", "bn-scale"):
            s = _slice_scores(t, m.dim, 2) if importance == "l2" else _slice_scores(t, m.dim, 1)
        elif importance == "taylor":
            g = (grads or {}).get((m.owner, m.param))
            if g is None:
                continue
            s = _slice_scores(t.detach() * g, m.dim, 1)
        else:  # pragma: no cover - validated by options
            raise ValueError(importance)
        units = ca.labels[ca.spaces[m.space].base + m.index_map]
        per = np.bincount(units, weights=s, minlength=n)
        touched = np.bincount(units, minlength=n) > 0
        total += per
        count += touched
        best = np.where(touched, np.maximum(best, per), best)
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduce == "sum":
            out = np.where(count > 0, total, np.nan)
        elif reduce == "max":
            out = np.where(count > 0, best, np.nan)
        else:
            out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


def taylor_grads(
    graph: Graph, ctx: PassContext, batches: int
) -> dict[tuple[str, str], torch.Tensor]:
    """Accumulated ``∂L/∂w`` over up to ``batches`` data batches."""
    if ctx.data is None:
        raise DataError(
            "prune: importance=taylor needs data (pipeline.run(graph, data=...), CLI --data)"
        )
    gm = graph.module
    named = dict(gm.named_parameters())
    grads = {k: torch.zeros_like(p) for k, p in named.items()}
    was = {k: p.requires_grad for k, p in named.items()}
    for p in named.values():
        p.requires_grad_(True)
    try:
        for i, (inputs, labels) in enumerate(ctx.batches()):
            if i >= batches:
                break
            gm.zero_grad(set_to_none=True)
            out = gm(*inputs)
            logits = out[0] if isinstance(out, (tuple, list)) else out
            target = labels if labels is not None else logits.detach().argmax(-1)
            loss = nn.functional.cross_entropy(logits, target)
            loss.backward()
            for k, p in named.items():
                if p.grad is not None:
                    grads[k] += p.grad.detach()
    finally:
        gm.zero_grad(set_to_none=True)
        for k, p in named.items():
            p.requires_grad_(was[k])
    return {tuple(k.rsplit(".", 1)) if "." in k else ("", k): g for k, g in grads.items()}


# -- selection --------------------------------------------------------------------------------------
def _n_remove(n: int, ratio: float, max_ratio: float, round_to: int) -> int:
    remove = min(int(math.floor(ratio * n + 1e-9)), int(math.floor(max_ratio * n + 1e-9)), n - 1)
    keep = n - max(remove, 0)
    if round_to > 1:
        keep = min(n, int(math.ceil(keep / round_to) * round_to))
    return max(0, n - keep)


def select_units(
    ca: ChannelAnalysis, groups: list, scores: np.ndarray, opts: PruneOptions, ratio: float
) -> dict[int, np.ndarray]:
    """Units to remove, per group id."""
    chosen: dict[int, np.ndarray] = {}
    if opts.scope == "local":
        for g in groups:
            s = scores[g.units]
            k = _n_remove(g.size, ratio, opts.max_ratio, opts.round_to)
            if k <= 0 or np.all(np.isnan(s)):
                continue
            order = np.lexsort((g.units, np.nan_to_num(s, nan=np.inf)))
            chosen[g.id] = g.units[order[:k]]
        return chosen
    pool = []
    for g in groups:
        s = scores[g.units]
        if np.all(np.isnan(s)):
            continue
        mean = np.nanmean(s)
        norm = s / mean if mean > 0 else s
        for u, v in zip(g.units, norm):
            pool.append((float(np.nan_to_num(v, nan=np.inf)), int(u), g))
    pool.sort(key=lambda t: (t[0], t[1]))
    budget = int(math.floor(ratio * len(pool)))
    taken: dict[int, list[int]] = {}
    for _, u, g in pool:
        if budget <= 0:
            break
        cap = _n_remove(g.size, opts.max_ratio, opts.max_ratio, 1)
        if len(taken.get(g.id, [])) >= cap:
            continue
        taken.setdefault(g.id, []).append(u)
        budget -= 1
    for g in groups:
        if g.id in taken:
            lst = taken[g.id]
            k = _n_remove(g.size, len(lst) / g.size, opts.max_ratio, opts.round_to)
            chosen[g.id] = np.array(lst[:k] if k <= len(lst) else lst)
    return chosen


# -- surgery ----------------------------------------------------------------------------------------
def _set_tensor(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    elif name in getattr(mod, "_buffers", {}):
        mod._buffers[name] = value.contiguous()
    else:
        setattr(mod, name, value.contiguous())


def fix_attributes(mod: nn.Module, depthwise: bool = False) -> None:
    """Make a module's size attributes agree with its (sliced) parameters."""
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    convts = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    if isinstance(mod, convs):
        out_g = mod.out_channels // mod.groups
        mod.out_channels = mod.weight.shape[0]
        if depthwise:
            mod.groups = mod.out_channels // out_g
        mod.in_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, convts):
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


def _is_depthwise(mod: nn.Module) -> bool:
    return (
        isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and mod.groups > 1
        and mod.in_channels == mod.groups
    )


def plan_members(ca: ChannelAnalysis, removed: np.ndarray) -> list[dict[str, Any]]:
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


def apply_members(root: nn.Module, members: list[dict[str, Any]]) -> list[str]:
    """Slice the listed parameters of ``root`` and fix the touched modules' attributes."""
    depthwise = {}
    attention: dict[str, int] = {}
    for e in members:
        mod = root.get_submodule(e["owner"]) if e["owner"] else root
        depthwise.setdefault(e["owner"], _is_depthwise(mod))
        if isinstance(mod, nn.MultiheadAttention):
            attention[e["owner"]] = mod.head_dim
    touched = []
    for e in members:
        mod = root.get_submodule(e["owner"]) if e["owner"] else root
        t = getattr(mod, e["param"])
        n = t.shape[e["dim"]]
        keep = torch.tensor(sorted(set(range(n)) - set(e["removed"])), dtype=torch.long)
        with torch.no_grad():
            _set_tensor(mod, e["param"], t.detach().index_select(e["dim"], keep))
        touched.append(e["owner"])
    for owner in dict.fromkeys(touched):
        mod = root.get_submodule(owner) if owner else root
        fix_attributes(mod, depthwise.get(owner, False))
    for owner, head_dim in attention.items():
        _to_self_attention(root, owner, head_dim)
    return list(dict.fromkeys(touched))


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


def _space_new_sizes(ca: ChannelAnalysis, removed: np.ndarray) -> dict[int, int]:
    return {s.id: int(s.size - removed[s.base : s.base + s.size].sum()) for s in ca.spaces}


def _new_shape(
    ca: ChannelAnalysis, node_name: str, new_sizes: dict[int, int], out: int = 0
) -> list[int]:
    shape = []
    for s in ca.layout.get((node_name, out), []):
        if len(s.dims) == 1:
            shape.append(new_sizes[s.id])
        else:
            outer = [sz for d, sz in zip(s.dims, s.sizes) if d != s.inner]
            inner_new = new_sizes[s.id] // max(1, int(np.prod(outer)))
            shape.extend(inner_new if d == s.inner else sz for d, sz in zip(s.dims, s.sizes))
    return shape


def rewrite_nodes(ca: ChannelAnalysis, gm: fx.GraphModule, removed: np.ndarray) -> None:
    """Recompute constant shape arguments of reshape / layer_norm / split nodes."""
    new_sizes = _space_new_sizes(ca, removed)
    nodes = {n.name: n for n in gm.graph.nodes}
    for rw in ca.rewrites:
        node = nodes.get(rw.node)
        if node is None:
            continue
        if rw.kind == "reshape":
            shape = _new_shape(ca, node.name, new_sizes)
            old = ca.layout_shape(node.name)
            if shape == list(old):
                continue
            args = list(node.args)
            vals = (
                args[1:]
                if not (len(args) == 2 and isinstance(args[1], (list, tuple)))
                else list(args[1])
            )
            fixed = [
                (shape[i] if isinstance(v, int) and v != -1 and i < len(shape) else v)
                for i, v in enumerate(vals)
            ]
            if node.op == "call_method" and not (
                len(args) == 2 and isinstance(args[1], (list, tuple))
            ):
                node.args = (args[0], *fixed)
            else:
                node.args = (
                    args[0],
                    type(args[1])(fixed) if isinstance(args[1], (list, tuple)) else fixed,
                )
        elif rw.kind == "layer_norm":
            shape = _new_shape(ca, node.name, new_sizes)
            args = list(node.args)
            if len(args) > 1:
                args[1] = (shape[-1],)
                node.args = tuple(args)
            else:
                node.kwargs = {**node.kwargs, "normalized_shape": (shape[-1],)}
        elif rw.kind == "slice":
            sp = ca.spaces[rw.info["space"]]
            gone = removed[sp.base : sp.base + sp.size]
            start = rw.info["start"] - int(gone[: rw.info["start"]].sum())
            kept = rw.info["n"] - int(
                gone[rw.info["start"] : rw.info["start"] + rw.info["n"]].sum()
            )
            src, idx = node.args
            items = list(idx) if isinstance(idx, tuple) else [idx]
            items[rw.info["pos"]] = slice(start, start + kept)
            node.args = (src, tuple(items) if isinstance(idx, tuple) else items[0])
        elif rw.kind == "attention":
            _to_self_attention(gm, rw.info["path"], rw.info["head_dim"])
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


def remove_units(graph: Graph, ca: ChannelAnalysis, units: np.ndarray) -> list[dict[str, Any]]:
    """Physically remove the given units (component labels of ``ca``); returns the plan
    entries (members and removed indices)."""
    units = np.asarray(units, dtype=np.int64)
    bad = units[~ca.unit_prunable[units]] if len(units) else units
    if len(bad):
        raise GraphoptError(f"prune: units {bad[:5].tolist()} are locked or produce nothing")
    removed = np.isin(ca.labels, units)
    members = plan_members(ca, removed)
    apply_members(graph.module, members)
    rewrite_nodes(ca, graph.module, removed)
    graph.module.recompile()
    graph.invalidate()
    graph.propagate_shapes()
    return members


def zero_unit_inputs(graph: Graph, ca: ChannelAnalysis, units: np.ndarray) -> None:
    """Zero every consumer weight slice that reads the given units, so their channels no longer
    influence anything: removing exactly those units must then leave the outputs unchanged
    (for groups whose channels do not feed normalisation statistics)."""
    removed = np.isin(ca.labels, np.asarray(units, dtype=np.int64))
    for m in ca.members:
        if m.kind != "in":
            continue
        sp = ca.spaces[m.space]
        idx = np.nonzero(removed[sp.base + m.index_map])[0]
        if len(idx):
            t = _member_tensor(graph.module, m.owner, m.param)
            with torch.no_grad():
                t.index_fill_(m.dim, torch.as_tensor(idx, dtype=torch.long), 0.0)


def prune_once(graph: Graph, ctx: PassContext, opts: PruneOptions, ratio: float) -> dict[str, Any]:
    """One round: analyse, score, select, slice. Returns a report fragment with the plan."""
    ca = ChannelAnalysis(graph)
    groups, skipped = [], []
    for g in ca.groups:
        owners = {ca.members[i].owner for i in g.members}
        hit = [glob for glob in opts.ignore if any(fnmatch.fnmatchcase(o, glob) for o in owners)]
        if hit:
            skipped.append(
                {"group": g.id, "producers": g.producers, "reason": f"ignore {hit[0]!r}"}
            )
            continue
        groups.append(g)
    grads = taylor_grads(graph, ctx, opts.batches) if opts.importance == "taylor" else None
    scores = unit_scores(ca, opts.importance, opts.reduce, grads, seed=opts.seed)
    if opts.importance == "bn-scale":
        for g in list(groups):
            if np.all(np.isnan(scores[g.units])):
                groups.remove(g)
                skipped.append(
                    {"group": g.id, "producers": g.producers, "reason": "no norm layer (bn-scale)"}
                )
    chosen = select_units(ca, groups, scores, opts, ratio)
    removed_units = np.concatenate(list(chosen.values())) if chosen else np.zeros(0, dtype=np.int64)
    members = remove_units(graph, ca, removed_units)
    group_rows = []
    for g in ca.groups:
        k = len(chosen.get(g.id, []))
        group_rows.append(
            {
                "group": g.id,
                "producers": g.producers,
                "units": int(g.size),
                "removed_units": int(k),
                "members": sorted(
                    {f"{ca.members[i].owner}.{ca.members[i].param}" for i in g.members}
                ),
            }
        )
    return {
        "groups": group_rows,
        "skipped": skipped,
        "locked": ca.locked_summary(limit=0),
        "plan": members,
        "units_removed": int(len(removed_units)),
        "units_prunable": int(sum(g.size for g in ca.groups)),
    }


def _cost(graph: Graph, kind: str) -> int:
    from graphopt.cost import cost_of

    c = cost_of(graph)
    return c.macs if kind == "macs" else c.params


def _check_ready(graph: Graph, opts: PruneOptions) -> None:
    for path, mod in graph.module.named_modules():
        if mod.training and isinstance(mod, (nn.modules.batchnorm._NormBase, nn.Dropout)):
            raise GraphoptError(
                f"prune: module {path or type(mod).__name__!r} is in training mode; call model.eval() before tracing"
            )
    if opts.ignore:
        paths = [p for p, _ in graph.module.named_modules()] + [
            p for p, _ in graph.module.named_parameters()
        ]
        for glob in opts.ignore:
            if not any(fnmatch.fnmatchcase(p, glob) for p in paths):
                log.warning("prune: ignore glob %r matches no module", glob)


class Prune(Pass):
    """Remove channels (structured pruning) with dependency propagation; layers shrink."""

    name = "prune"
    exact = False
    Options = PruneOptions

    @classmethod
    def uses_data(cls, options: PruneOptions) -> bool:
        """Taylor importance reads data (a ``between`` pipeline's needs the manager adds)."""
        return options.importance == "taylor"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        _check_ready(graph, opts)
        if opts.importance == "taylor" and ctx.data is None:
            raise DataError(
                "prune: importance=taylor needs data (pipeline.run(graph, data=...), CLI --data)"
            )
        params0 = sum(p.numel() for p in graph.module.parameters())
        ratio = opts.ratio
        search = None
        if opts.target is not None:
            ratio, search = self._search(graph, ctx, opts)
        rounds = []
        between: list[dict[str, Any]] = []
        plan: list[dict[str, Any]] = []
        kept = 1.0 - ratio
        for step in range(1, opts.steps + 1):
            # cumulative keep fraction kept**(step/steps); this round keeps the quotient
            r = 1.0 - kept ** (1.0 / opts.steps) if opts.steps > 1 else ratio
            rep = prune_once(graph, ctx, opts, r)
            rounds.append(rep)
            plan.append({"round": step, "members": rep["plan"]})
            if opts.between is not None and step < opts.steps:
                between.append(_run_between(graph, ctx, opts.between, step))
        params1 = sum(p.numel() for p in graph.module.parameters())
        modified = any(r["units_removed"] for r in rounds)
        report: dict[str, Any] = {
            "ratio": ratio,
            "params_before": params0,
            "params_after": params1,
            "groups": rounds[-1]["groups"] if opts.steps == 1 else [r["groups"] for r in rounds],
            "skipped": rounds[0]["skipped"],
            "locked": rounds[0]["locked"],
            "units_removed": sum(r["units_removed"] for r in rounds),
            "units_prunable": rounds[0]["units_prunable"],
            "summary": (
                f"removed {sum(r['units_removed'] for r in rounds)} of {rounds[0]['units_prunable']} "
                f"prunable channels; params {params0:,} -> {params1:,}"
            ),
        }
        if search is not None:
            report["target_search"] = search
        if between:
            report["between"] = between
        plan_doc = {"format": "graphopt-prune-plan", "version": 1, "rounds": plan}
        report["plan"] = plan_doc
        if ctx.out_dir is not None:
            path = write_json(Path(ctx.out_dir) / "prune_plan.json", plan_doc)
            report["plan_path"] = str(path)
        return PassResult(modified, report)

    def _search(
        self, graph: Graph, ctx: PassContext, opts: PruneOptions
    ) -> tuple[float, dict[str, Any]]:
        kind, frac = parse_target(opts.target or "")
        base = _cost(graph, kind)
        lo, hi = 0.0, opts.max_ratio
        best = (0.0, 1.0)
        tried = []

        def kept_at(r: float) -> float:
            g = graph.copy()
            prune_once(g, ctx, opts, r)
            return _cost(g, kind) / base

        k_hi = kept_at(hi)
        tried.append((hi, k_hi))
        if k_hi > frac * 1.02:
            raise OptionError(
                f"prune: target {opts.target} cannot be met: at max-ratio={opts.max_ratio} the model keeps "
                f"{k_hi:.1%} of its {kind}; raise max-ratio or lower the target"
            )
        for _ in range(12):
            mid = (lo + hi) / 2
            k = kept_at(mid)
            tried.append((mid, k))
            if abs(k - frac) <= 0.02 * frac:
                best = (mid, k)
                break
            if k > frac:
                lo = mid
            else:
                hi = mid
            best = (mid, k)
        return best[0], {"target": opts.target, "ratio": best[0], "kept": best[1], "tried": tried}


def apply_plan(model: nn.Module, plan: dict[str, Any] | str | Path) -> nn.Module:
    """Replay a pruning plan on a fresh instance of the same architecture (in place).

    After this, ``model.load_state_dict(pruned_state_dict)`` loads the pruned checkpoint.
    Shape constants hard-coded in the model's Python ``forward`` are not rewritten (the traced
    Graph rewrites them); plans for models whose forward computes shapes dynamically replay
    exactly.
    """
    if isinstance(plan, (str, Path)):
        plan = json.loads(Path(plan).read_text())
    if plan.get("format") != "graphopt-prune-plan":
        raise GraphoptError("apply_plan: not a graphopt pruning plan (missing format field)")
    for rnd in plan["rounds"]:
        for e in rnd["members"]:
            try:
                (model.get_submodule(e["owner"]) if e["owner"] else model)
            except AttributeError as err:
                raise GraphoptError(
                    f"apply_plan: the model has no module {e['owner']!r}; is it the same architecture?"
                ) from err
        apply_members(model, rnd["members"])
    return model
