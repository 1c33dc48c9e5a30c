"""Per-layer quantization sensitivity: which layer to keep in float (``qdq(skip=[...])``).

For each quantizable layer ``l`` the graph is quantized with every *other* unit skipped, and
the output's signal-to-quantization-noise ratio against float is measured on held data::

    SQNR_l = 10 log10( Σ y² / Σ (y - ŷ_l)² )   (dB; higher is better)

The layers with the lowest SQNR hurt most when quantized. AIMET and ORT's debugger report the
same view; here it reuses qdq's own placement and calibration, so the numbers are what
``qdq`` with that option string would give for the layer alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from graphopt.graph import Graph
from graphopt.options import build_options
from graphopt.pass_api import PassContext
from graphopt.passes.qdq.placement import plan
from graphopt.pipeline_text import parse_items

log = logging.getLogger(__name__)


def _flat(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().double().flatten()
    if isinstance(out, dict):
        out = list(out.values())
    return torch.cat([_flat(o) for o in out if isinstance(o, (torch.Tensor, list, tuple, dict))])


def quant_sensitivity(
    graph: Graph,
    data: list,
    options: str = "",
    progress: Callable[..., Iterable] | None = None,
) -> list[dict[str, Any]]:
    """``[{"layer", "kind", "sqnr_db"}]`` sorted from most to least sensitive. ``options`` are
    extra ``qdq`` options (``"weights=per-tensor"``); ``data`` feeds calibration and the
    measurement (its first batch)."""
    from graphopt.passes.qdq.qdq import QDQ

    graph.propagate_shapes()
    units = plan(graph.module).units
    paths = [str(u.op.target) if u.op.op == "call_module" else u.op.name for u in units]
    batch = data[0] if isinstance(data[0], (tuple, list)) else (data[0],)
    with torch.no_grad():
        ref = _flat(graph.module(*batch))
    rows = []
    items = list(zip(units, paths))
    for unit, path in progress(items, desc="sensitivity", total=len(items)) if progress else items:
        others = [p for p in paths if p != path]
        skip = "[" + ",".join(others) + "]" if others else "[]"
        opts = ",".join(x for x in (options, f"skip={skip}") if x)
        trial = graph.copy()
        (item,) = parse_items(f"qdq({opts})")
        QDQ(build_options("qdq", QDQ.Options, item.options)).run(trial, PassContext(data=data))
        with torch.no_grad():
            noise = (ref - _flat(trial.module(*batch))).pow(2).sum().item()
        signal = ref.pow(2).sum().item()
        sqnr = 10 * torch.log10(torch.tensor(signal / noise)).item() if noise > 0 else None
        rows.append({"layer": path, "kind": unit.kind, "sqnr_db": sqnr})
        log.info("sensitivity: %s %s dB", path, "inf" if sqnr is None else f"{sqnr:.1f}")
    return sorted(rows, key=lambda r: float("inf") if r["sqnr_db"] is None else r["sqnr_db"])
