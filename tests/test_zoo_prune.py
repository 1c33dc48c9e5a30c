"""Every torchvision classification model: the channel analysis finds prunable groups, and
removing channels whose consumers were zeroed first leaves the outputs unchanged (1e-5)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.channels import ChannelAnalysis
from graphopt.passes.prune import remove_units

from .channel_helpers import zero_unit_inputs
from .zoo import MODELS, build


def _randomize(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
        if isinstance(m, nn.Linear) and not m.weight.detach().any():  # zero-initialised heads
            nn.init.normal_(m.weight, std=0.02, generator=g)
    return model.eval()


def test_zoo_has_80_models():
    assert len(MODELS) == 80


@pytest.mark.parametrize("name", MODELS)
def test_zeroed_channel_equivalence(name):
    model, x = build(name)
    g = graphopt.trace(_randomize(model), x)
    del model
    ca = ChannelAnalysis(g)
    assert ca.groups, f"{name}: no prunable group"
    rng = np.random.default_rng(0)
    units = []
    for grp in ca.groups:
        if not grp.stats_coupled and grp.size >= 2:
            units.extend(rng.choice(grp.units, grp.size // 2, replace=False).tolist())
    assert units, f"{name}: every group feeds normalisation statistics"
    units = np.array(units, dtype=np.int64)
    zero_unit_inputs(g, ca, units)
    with torch.no_grad():
        ref = g.module(x)
    p0 = sum(p.numel() for p in g.module.parameters())
    remove_units(g, ca, units)
    with torch.no_grad():
        out = g.module(x)
    p1 = sum(p.numel() for p in g.module.parameters())
    assert p1 < p0
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)
    del g, ca, ref, out
    gc.collect()
