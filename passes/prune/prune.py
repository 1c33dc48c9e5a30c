"""``prune``: structured channel pruning with dependency propagation.

The channel analysis (:mod:`graphopt.channels`) splits the graph's channels into *units* (one
channel, coupled across every tensor and parameter it touches) and *groups* (units touching
the same spaces). For each group the pass scores every unit, removes the lowest-scoring
``ratio`` of them and physically slices every member parameter, so the layers shrink.

Importance of unit ``u`` in a group with members ``m`` (parameter slices along their pruned
dim): ``l1``: ``s_m(u) = Σ|w|``; ``l2``: ``s_m(u) = Σ w²``; ``bn-scale``: ``|γ|`` of the norm
layers in the group (groups without one are left whole); ``taylor``: ``Σ|w · ∂L/∂w|`` summed
over the data batches (``L`` is the cross-entropy with the labels, or with the model's own
predictions when the batches carry none, per token for ``[B, T, C]`` outputs; the first
tensor of a tuple or dict output is read); ``activation``: ``Σ_j E[x_j²]`` over the input
indices ``j`` of the unit in the layers reading it, on the data batches (for a head, the squared
norm of its attention output; :mod:`.activation`); ``random``. Member scores are combined with
``reduce`` (mean, sum or max). ``scope=global`` ranks units of all groups together after
dividing each group's scores by their mean. ``target=macs:F`` / ``params:F`` searches the
ratio (bisection) until the pruned cost is within 2% of ``F`` times the original.

Attention heads are units too: a head is the ``D`` rows of head ``h`` in the q, k and v
projections and the same ``D`` columns of the output projection, one group per layer, so
``ratio`` removes ``floor(ratio · H)`` whole heads of each layer (the report's ``heads`` lists
each layer's count and says when the ratio was rounded; a layer always keeps a head) and the
head score is the member scores over those rows and columns (``l2``: ``Σ w²`` of each; taylor
likewise). With grouped-query attention a unit is one key/value head and its query group.
``units`` chooses which kinds of group are pruned, alone or joined by ``+``: ``heads``,
``hidden`` (channels normalised by a norm's statistics, LayerNorm, RMSNorm or GroupNorm: in a
transformer its hidden width, i.e. the embeddings, every LayerNorm, the residual stream and the
head's input), ``channels`` (everything else: FFN widths, conv filters); ``all`` (the default)
is ``heads+hidden+channels``. A norm over fewer channels normalises with statistics of fewer
channels, so pruning ``hidden`` is lossy even for channels that carry zeros.

The pass writes a pruning plan (``prune_plan.json`` in the run's output dir): for every
member the indices removed along its dim. :func:`apply_plan` replays it on a fresh instance of
the same architecture so a pruned checkpoint loads with ``load_state_dict``. The surgery (slicing
parameters, fixing module attributes, rewriting shape constants, the plan format and its replay)
lives in :mod:`graphopt.channels.surgery`; this pass reads the analysis' groups, members and
lock reasons, scores and selects units and calls the surgery.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.nn as nn

from graphopt.atomic import write_json
from graphopt.channels import ChannelAnalysis
from graphopt.channels.surgery import apply_plan, plan_document, remove_units
from graphopt.errors import DataError, GraphoptError, OptionError
from graphopt.graph import Graph
from graphopt.pass_api import Pass, PassContext, PassResult
from graphopt.pipeline_text import parse_items

from .activation import activation_scores
from .importance import taylor_grads, unit_scores

__all__ = [
    "Prune",
    "PruneOptions",
    "apply_plan",  # re-exported from graphopt.channels.surgery
    "prune_once",
    "remove_units",  # re-exported from graphopt.channels.surgery
    "select_units",
]

log = logging.getLogger(__name__)

Importance = Literal["l1", "l2", "bn-scale", "taylor", "activation", "random"]


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
    units: str = field(
        default="all",
        metadata={
            "help": "what to prune, kinds joined by '+': heads (whole heads of q, k, v and the "
            "output projection), hidden (widths normalised by LayerNorm/RMSNorm/GroupNorm: a "
            "transformer's hidden width), channels (everything else: FFN widths, conv "
            "filters), or all"
        },
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
    batches: int = field(
        default=4, metadata={"help": "data batches used by taylor and activation importance"}
    )
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
        unit_kinds(self.units)
        if self.target is not None:
            parse_target(self.target)
        if self.between is not None:
            if self.steps < 2:
                raise OptionError("prune: between needs steps >= 2 (it runs between rounds)")
            parse_items(self.between)  # syntax; the manager checks the pass names


UNIT_KINDS = ("heads", "hidden", "channels")


def unit_kinds(text: str) -> frozenset[str]:
    """The kinds of group ``units=TEXT`` prunes (``all``, or kinds joined by ``+``)."""
    kinds = [k.strip() for k in text.split("+")]
    if kinds == ["all"]:
        return frozenset(UNIT_KINDS)
    bad = [k for k in kinds if k not in UNIT_KINDS]
    if bad or not kinds:
        raise OptionError(
            f"prune: units must be all or kinds joined by '+' from {', '.join(UNIT_KINDS)}; "
            f"got {text!r}"
        )
    return frozenset(kinds)


def group_kind(group: Any) -> str:
    """``heads``, ``hidden`` (normalised by a norm's statistics) or ``channels``."""
    if group.heads:
        return "heads"
    return "hidden" if group.stats_coupled else "channels"


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


def prune_once(
    graph: Graph, ctx: PassContext, opts: PruneOptions, ratio: float, *, propagate: bool = True
) -> dict[str, Any]:
    """One round: analyse, score, select, slice. Returns a report fragment with the plan.
    ``propagate=False`` skips the shape propagation after the surgery (the last round: the
    pass manager propagates after every pass)."""
    t0 = time.perf_counter()
    ca = ChannelAnalysis(graph)
    t1 = time.perf_counter()
    groups, skipped = [], []
    kinds = unit_kinds(opts.units)
    for g in ca.groups:
        if group_kind(g) not in kinds:
            skipped.append(
                {"group": g.id, "producers": g.producers, "reason": f"units={opts.units}"}
            )
            continue
        owners = {ca.members[i].owner for i in g.members}
        hit = [glob for glob in opts.ignore if any(fnmatch.fnmatchcase(o, glob) for o in owners)]
        if hit:
            skipped.append(
                {"group": g.id, "producers": g.producers, "reason": f"ignore {hit[0]!r}"}
            )
            continue
        groups.append(g)
    grads = taylor_grads(graph, ctx, opts.batches) if opts.importance == "taylor" else None
    acts = None
    if opts.importance == "activation":
        acts = activation_scores(graph, ctx, opts.batches, ca)
    scores = unit_scores(ca, opts.importance, opts.reduce, grads, seed=opts.seed, acts=acts)
    no_opinion = {
        "bn-scale": "no norm layer (bn-scale)",
        "activation": "no layer reads its channels one by one (activation)",
    }.get(opts.importance)
    if no_opinion is not None:
        for g in list(groups):
            if np.all(np.isnan(scores[g.units])):
                groups.remove(g)
                skipped.append({"group": g.id, "producers": g.producers, "reason": no_opinion})
    chosen = select_units(ca, groups, scores, opts, ratio)
    removed_units = np.concatenate(list(chosen.values())) if chosen else np.zeros(0, dtype=np.int64)
    t2 = time.perf_counter()
    members = remove_units(graph, ca, removed_units, propagate=propagate)
    t3 = time.perf_counter()
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
        "heads": _head_rows(groups, chosen, opts, ratio),
        "skipped": skipped,
        "locked": ca.locked_summary(limit=0),
        "plan": members,
        "units_removed": int(len(removed_units)),
        "units_prunable": int(sum(g.size for g in ca.groups)),
        "seconds": {"analysis": t1 - t0, "scoring": t2 - t1, "surgery": t3 - t2},
    }


def _head_rows(groups: list, chosen: dict, opts: PruneOptions, ratio: float) -> list[dict]:
    """Per attention layer: heads before and after, and how the ratio was rounded.

    A layer keeps at least one head: ``floor(ratio · H)`` heads go (``max-ratio`` and
    ``round-to`` as for channels), and ``ratio < 1`` never reaches ``H``."""
    rows = []
    for g in groups:
        if not g.heads:
            continue
        k = len(chosen.get(g.id, []))
        row = {"layer": _layer_name(g.producers), "heads": int(g.size), "removed": k}
        want = ratio * g.size
        if opts.scope == "local" and abs(want - k) > 1e-9:
            row["rounded"] = f"ratio {ratio:g} of {g.size} heads is {want:g}; removed {k}"
            log.info("prune: %s: %s", row["layer"], row["rounded"])
        rows.append(row)
    return rows


def _layer_name(paths: list[str]) -> str:
    """The module path the given ones share (``a.attn`` for ``a.attn.q``, ``a.attn.k``)."""
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) if common else ", ".join(paths)


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
        """Taylor and activation importance read data (a ``between`` pipeline's needs the
        manager adds)."""
        return options.importance in ("taylor", "activation")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        _check_ready(graph, opts)
        if self.uses_data(opts) and ctx.data is None:
            raise DataError(
                f"prune: importance={opts.importance} needs data "
                "(pipeline.run(graph, data=...), CLI --data)"
            )
        params0 = sum(p.numel() for p in graph.module.parameters())
        ratio = opts.ratio
        search = None
        if opts.target is not None:
            ratio, search = self._search(graph, ctx, opts)
        rounds = []
        between: list[dict[str, Any]] = []
        plan: list[list[dict[str, Any]]] = []
        kept = 1.0 - ratio
        for step in range(1, opts.steps + 1):
            # cumulative keep fraction kept**(step/steps); this round keeps the quotient
            r = 1.0 - kept ** (1.0 / opts.steps) if opts.steps > 1 else ratio
            last = step == opts.steps
            rep = prune_once(graph, ctx, opts, r, propagate=not last)
            rounds.append(rep)
            plan.append(rep["plan"])
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
            "seconds": {
                k: sum(r["seconds"][k] for r in rounds) for k in ("analysis", "scoring", "surgery")
            },
            "heads": rounds[-1]["heads"] if opts.steps == 1 else [r["heads"] for r in rounds],
            "summary": (
                f"removed {sum(r['units_removed'] for r in rounds)} of {rounds[0]['units_prunable']} "
                f"prunable channels; params {params0:,} -> {params1:,}"
            ),
        }
        heads = [h for r in rounds for h in r["heads"]]
        if heads:
            report["summary"] += (
                f"; attention heads {sum(h['heads'] for h in rounds[0]['heads'])} -> "
                f"{sum(h['heads'] - h['removed'] for h in rounds[-1]['heads'])}"
                + (
                    " (rounded down per layer, see heads)"
                    if any("rounded" in h for h in heads)
                    else ""
                )
            )
        if rounds[0]["units_prunable"] == 0 and ratio > 0:
            log.warning(
                "prune: nothing to prune: no output channel of any layer is free to remove (%d "
                "layers locked%s); prune before qdq, and see 'graphopt inspect' for the reasons",
                len(report["locked"]),
                f", e.g. {report['locked'][0]['layer']}: {report['locked'][0]['reason']}"
                if report["locked"]
                else "; the graph has no conv/linear modules",
            )
        if ratio > opts.max_ratio and opts.target is None:
            report["capped"] = (
                f"ratio={ratio} asks for more than max-ratio={opts.max_ratio} of any group's "
                f"channels; each group lost at most {opts.max_ratio:.0%} (raise max-ratio to go "
                "further)"
            )
            report["summary"] += f"; capped at max-ratio={opts.max_ratio}"
            log.warning("prune: %s", report["capped"])
        if search is not None:
            report["target_search"] = search
        if between:
            report["between"] = between
        plan_doc = plan_document(plan)
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
