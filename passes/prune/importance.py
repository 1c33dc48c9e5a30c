"""Importance scores for ``prune``: one score per channel-analysis unit.

A unit's score combines its member scores (parameter slices along their pruned dim) with
``reduce`` (mean, sum or max): ``l1`` ``Σ|w|``, ``l2`` ``Σ w²``, ``bn-scale`` ``|γ|`` of the
norm layers, ``taylor`` ``Σ|w · ∂L/∂w|`` over data batches (:func:`taylor_grads`),
``activation`` ``Σ E[x²]`` of what the unit feeds the layers reading it, on data batches
(:func:`~graphopt.passes.prune.activation.activation_scores`; for a head, its
attention-output norm), ``random``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from graphopt.channels import ChannelAnalysis
from graphopt.channels.surgery import member_tensor
from graphopt.errors import DataError
from graphopt.graph import Graph
from graphopt.pass_api import PassContext

__all__ = ["taylor_grads", "unit_scores"]


def _slice_scores(
    t: torch.Tensor, dim: int, p: int, planes: dict[Any, Any] | None = None
) -> np.ndarray:
    """``Σ|x|^p`` over each slice of ``t`` along ``dim``. For dim 0 or 1 of a k x k weight, from
    the plane ``P[i, j] = Σ_k |x[i, j, k]|^p``: output channel ``i`` scores ``Σ_j P[i, j]``,
    input channel ``j`` ``Σ_i P[i, j]``; both are kept in ``planes``, so the weight is read once.
    Powers go into one reused scratch buffer (``planes["scratch"]``): p-norm reductions, or a
    fresh tensor per weight (page faults), cost twice as much on resnet50."""
    x = t.detach()
    if x.dim() > 2 and dim in (0, 1):
        sums = planes.get((id(t), p)) if planes is not None else None
        if sums is None:
            one = x[0, 0].numel() == 1  # a 1 x 1 conv's weight is its own plane
            plane = (
                _power(x.flatten(1), p, planes) if one else _power(x, p, planes).flatten(2).sum(2)
            )
            sums = (plane.sum(1), plane.sum(0))
            if planes is not None:
                planes[(id(t), p)] = sums
        s = sums[dim]
    else:
        x = _power(x, p, planes)
        others = [d for d in range(x.dim()) if d != dim]
        s = x.sum(dim=others) if others else x.clone()
    return s.double().numpy()


def _power(x: torch.Tensor, p: int, planes: dict[Any, Any] | None) -> torch.Tensor:
    """``|x|^p`` (p in {1, 2}) in float32, or float64 for float64 ``x``, written into
    ``planes["scratch"]`` (grown as needed) when given; valid until the next call."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = None
    if planes is not None:
        buf = planes.get("scratch")
        if buf is None or buf.dtype != dtype or buf.numel() < x.numel():
            buf = planes["scratch"] = torch.empty(x.numel(), dtype=dtype)
        out = buf[: x.numel()].view(x.shape)
    x = x.to(dtype)
    return torch.abs(x, out=out) if p == 1 else torch.square(x, out=out)


def unit_scores(
    ca: ChannelAnalysis,
    importance: str,
    reduce: str,
    grads: dict | None = None,
    seed: int = 0,
    acts: dict | None = None,
) -> np.ndarray:
    """A score per unit (NaN where the criterion has no opinion). ``grads`` feed ``taylor``,
    ``acts`` (per input index of each ``"in"`` member) ``activation``."""
    n = ca.n_units
    if importance == "random":
        return np.random.default_rng(seed).random(n)
    total = np.zeros(n)
    count = np.zeros(n)
    best = np.full(n, -np.inf)
    gm = ca.gm
    planes: dict[Any, Any] = {}
    for m in ca.members:
        if importance == "bn-scale":
            if not (m.kind == "norm" and m.param == "weight"):
                continue
        elif m.kind not in ("out", "in"):
            continue
        units = ca.units_of(m)
        if not ca.unit_prunable[units].any():
            continue  # no unit of this member can go: its score is never read
        if importance == "activation":
            s = (acts or {}).get((m.owner, m.param)) if m.kind == "in" else None
            if s is None or len(s) != len(m.index_map):
                continue  # not read in the graph, or read grouped (no opinion)
        elif importance in ("l1", "bn-scale"):
            s = _slice_scores(member_tensor(gm, m, ca.modules), m.dim, 1, planes)
        elif importance == "l2":
            s = _slice_scores(member_tensor(gm, m, ca.modules), m.dim, 2, planes)
        elif importance == "taylor":
            g = (grads or {}).get((m.owner, m.param))
            if g is None:
                continue
            s = _slice_scores(member_tensor(gm, m, ca.modules).detach() * g, m.dim, 1)
        else:  # pragma: no cover - validated by options
            raise ValueError(importance)
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
            logits = _first_tensor(out)
            if labels is None and logits.dim() > 2:  # per-token outputs [B, T, C]: per token
                logits = logits.reshape(-1, logits.shape[-1])
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


def _first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model output (a tensor, a tuple, or a dict / ``ModelOutput``)."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return next(t for t in out if isinstance(t, torch.Tensor))
    return out
