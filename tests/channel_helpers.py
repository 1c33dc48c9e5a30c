"""Test helpers for the channel analysis and its surgery."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

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


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (in place), then eval mode, so a
    pruning that mixes up channels changes the outputs."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()
