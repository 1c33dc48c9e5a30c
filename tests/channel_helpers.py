"""Test helpers for the channel analysis and its surgery."""

from __future__ import annotations

import numpy as np
import torch

from graphopt.channels import ChannelAnalysis
from graphopt.channels.surgery import member_tensor
from graphopt.graph import Graph


def zero_unit_inputs(graph: Graph, ca: ChannelAnalysis, units: np.ndarray) -> None:
    """Zero every consumer weight slice that reads the given units, so their channels no longer
    influence anything: removing exactly those units must then leave the outputs unchanged
    (for groups whose channels do not feed normalisation statistics)."""
    units = np.asarray(units, dtype=np.int64)
    for m in ca.members:
        if m.kind != "in":
            continue
        idx = np.nonzero(np.isin(ca.units_of(m), units))[0]
        if len(idx):
            t = member_tensor(graph.module, m)
            with torch.no_grad():
                t.index_fill_(m.dim, torch.as_tensor(idx, dtype=torch.long), 0.0)
