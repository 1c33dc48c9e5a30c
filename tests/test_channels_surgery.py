"""Channel surgery: removing units whose outgoing weights were zeroed leaves the outputs
unchanged, module attributes and shape constants follow the sliced parameters, and a plan
replays on a fresh model."""

from __future__ import annotations

import json
import operator

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.channels import ChannelAnalysis
from graphopt.channels.surgery import (
    PLAN_FORMAT,
    apply_plan,
    member_tensor,
    plan_document,
    remove_units,
)
from graphopt.errors import GraphoptError

from .channel_helpers import zero_unit_inputs

X = torch.randn(2, 3, 6, 6)


class Mixed(nn.Module):
    """Residual add, concat, depthwise conv, a view with a constant channel count, a channel
    slice and flatten into a linear layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.side = nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(14, 10, 1)
        self.fc = nn.Linear(6 * 9, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = y + self.pw(F.relu(self.dw(y)))
        z = F.relu(self.mix(torch.cat([y, self.side(x)], 1)))
        n = z.shape[0]
        z = z.view(n, 10, 36)[:, 2:8].view(n, 6, 6, 6)
        return self.fc(F.max_pool2d(z, 2).flatten(1))


def _randomize(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _half_of_every_group(ca: ChannelAnalysis) -> np.ndarray:
    rng = np.random.default_rng(0)
    units = [rng.choice(g.units, g.size // 2, replace=False) for g in ca.groups if g.size >= 2]
    return np.concatenate(units).astype(np.int64)


def test_removing_zeroed_channels_keeps_outputs():
    g = graphopt.trace(_randomize(Mixed()), X)
    ca = ChannelAnalysis(g)
    assert {p for grp in ca.groups for p in grp.producers} >= {"stem", "pw", "side", "mix"}
    units = _half_of_every_group(ca)
    zero_unit_inputs(g, ca, units)
    with torch.no_grad():
        ref = g.module(X)
    p0 = sum(p.numel() for p in g.module.parameters())
    plan = remove_units(g, ca, units)
    with torch.no_grad():
        out = g.module(X)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    m = g.module
    assert sum(p.numel() for p in m.parameters()) < p0
    assert m.stem.out_channels == m.pw.out_channels == m.dw.groups == m.bn.num_features < 8
    assert m.dw.in_channels == m.dw.out_channels == m.dw.weight.shape[0]
    assert m.mix.in_channels == m.stem.out_channels + m.side.out_channels
    assert m.bn.running_mean.shape == (m.bn.num_features,)
    assert {(e["owner"], e["param"]) for e in plan} >= {("stem", "weight"), ("bn", "running_var")}


def test_shape_constants_and_slice_bounds_are_rewritten():
    g = graphopt.trace(_randomize(Mixed()), X)
    ca = ChannelAnalysis(g)
    rows = next(m for m in ca.members if (m.owner, m.param, m.kind) == ("mix", "weight", "out"))
    # remove mix channels 0 (before the slice [2:8]) and 3 (inside it)
    units = np.unique(ca.units_of(rows)[[0, 3]])
    assert len(units) == 2 and ca.unit_prunable[units].all()
    zero_unit_inputs(g, ca, units)
    with torch.no_grad():
        ref = g.module(X)
    remove_units(g, ca, units)
    views = [n for n in g.module.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert views[0].args[2:] == (8, 36)  # (z, n, 10, 36) before
    getitem = next(
        n
        for n in g.module.graph.nodes
        if n.target is operator.getitem and isinstance(n.args[1], tuple)
    )
    assert getitem.args[1][1] == slice(1, 6)  # start moved by one, one channel inside gone
    assert views[1].args[2] == 5
    with torch.no_grad():
        torch.testing.assert_close(g.module(X), ref, rtol=1e-5, atol=1e-6)
    assert g.module.fc.in_features == 5 * 9


def test_member_tensor_is_the_live_parameter():
    g = graphopt.trace(_randomize(Mixed()), X)
    ca = ChannelAnalysis(g)
    m = next(m for m in ca.members if m.owner == "bn" and m.param == "running_mean")
    assert member_tensor(g.module, m) is g.module.bn.running_mean
    assert len(ca.units_of(m)) == 8


def test_plan_replays_on_a_fresh_model(tmp_path):
    model = _randomize(Mixed())
    g = graphopt.trace(model, X)
    ca = ChannelAnalysis(g)
    entries = remove_units(g, ca, _half_of_every_group(ca))
    doc = plan_document([entries])
    assert doc["format"] == PLAN_FORMAT and doc["rounds"][0]["round"] == 1
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    fresh = apply_plan(Mixed().eval(), path)
    pruned = g.module.state_dict()
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in pruned.items()
    }
    fresh.load_state_dict(pruned)
    assert fresh.dw.groups == g.module.dw.groups


def test_apply_plan_refuses_foreign_documents():
    with pytest.raises(GraphoptError, match="not a graphopt pruning plan"):
        apply_plan(Mixed(), {"rounds": []})
    doc = plan_document([[{"owner": "nope", "param": "weight", "dim": 0, "removed": [0]}]])
    with pytest.raises(GraphoptError, match="no module 'nope'"):
        apply_plan(Mixed(), doc)


def test_a_plan_made_after_fold_bn_says_what_to_run_first(tmp_path):
    import json

    import graphopt
    from graphopt.errors import GraphoptError

    def net():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)
        ).eval()

    g = graphopt.trace(net(), torch.randn(1, 3, 10, 10))
    graphopt.Pipeline.parse("fold-bn,prune(ratio=0.5),dce").run(g, out_dir=tmp_path)
    plan = json.loads((tmp_path / "prune_plan.json").read_text())
    with pytest.raises(GraphoptError, match=r"'0\.bias'.*fold-bn.*compress"):
        apply_plan(net(), plan)
    folded = graphopt.compress(net(), "fold-bn", example_inputs=torch.randn(1, 3, 10, 10))
    apply_plan(folded.graph.module, plan)  # the advice works
    assert (
        folded.graph.module.get_submodule("0").out_channels
        == g.module.get_submodule("0").out_channels
    )
