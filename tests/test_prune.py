"""Channel pruning: ground-truth equivalence per coupling kind, plan replay, bad input.

The central check: pick units, zero every consumer weight that reads them (so those channels
influence nothing), then physically remove exactly those units — the outputs must not change.
A wrong coupling (a concat offset, a flatten index, a shuffle permutation) misaligns channels
and breaks it.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.channels import ChannelAnalysis
from graphopt.errors import DataError, GraphoptError, OptionError, PassFailure
from graphopt.modules import SelfAttention
from graphopt.passes.prune import apply_plan, remove_units
from graphopt.passes.prune.importance import _slice_scores

from .channel_helpers import randomize_bn, zero_unit_inputs


def zero_and_remove(model: nn.Module, x: torch.Tensor, fraction: float = 0.5, seed: int = 0):
    """Zero consumers of a random ``fraction`` of every group's units, then remove them.
    Returns (reference output, pruned output, analysis, pruned graph)."""
    g = graphopt.trace(randomize_bn(model), x)
    ca = ChannelAnalysis(g)
    rng = np.random.default_rng(seed)
    units = []
    for grp in ca.groups:
        if grp.stats_coupled:
            continue
        k = int(grp.size * fraction)
        if k:
            units.extend(rng.choice(grp.units, k, replace=False).tolist())
    units = np.array(units, dtype=np.int64)
    zero_unit_inputs(g, ca, units)
    g.module.recompile()
    with torch.no_grad():
        ref = g.module(x)
    remove_units(g, ca, units)
    g.propagate_shapes()
    with torch.no_grad():
        out = g.module(x)
    return ref, out, ca, g


def assert_equivalent(model, x, min_removed_params=0.05):
    p0 = sum(p.numel() for p in model.parameters())
    ref, out, ca, g = zero_and_remove(model, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    p1 = sum(p.numel() for p in g.module.parameters())
    assert p1 <= p0 * (1 - min_removed_params), f"only {p0 - p1} of {p0} params removed"
    return ca, g


# -- one synthetic net per coupling kind --------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(
            nn.Conv2d(16, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
        )
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a(x))
        return self.head(x).mean((2, 3))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, padding=1)
        self.fc1 = nn.Conv2d(24, 6, 1)
        self.fc2 = nn.Conv2d(6, 24, 1)
        self.out = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * s).flatten(1)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 10, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(16, 12, 3, padding=1)
        self.d = nn.Conv2d(28, 3, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)
        z = torch.cat((y, F.relu(self.c(y))), 1)
        return self.d(z)


class SplitChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(10, 4, 1)
        self.d = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        p, q = x.chunk(2, dim=1)
        r, s = torch.split(torch.cat([self.b(q), p], 1), [10, 6], dim=1)
        return self.c(r) + self.d(s)


class ChannelSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(3, 12, 1)
        self.d = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.b(self.a(x)[:, :8]) + self.d(F.relu(self.c(x)))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d((2, 3))
        self.fc = nn.Linear(12 * 6, 20)
        self.fc2 = nn.Linear(20, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc2(F.relu(self.fc(torch.flatten(x, 1))))


class ViewLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


class PermuteLinear(nn.Module):
    """ConvNeXt-style: channels-last linear layers between permutes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        x = self.conv(x)
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y)))
        return self.out(x + y.permute(0, 3, 1, 2))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)  # multiplier 2
        self.bn = nn.BatchNorm2d(32)
        self.pw2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.pw2(F.relu6(self.bn(self.dw(F.relu(self.pw1(x))))))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.b = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.g(F.relu(self.a(x)))))


class Shuffle(nn.Module):
    """ShuffleNet-v2-style: concat, channel shuffle (view/transpose/view), chunk."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        n, ch, h, w = y.size()
        y = y.view(n, 2, ch // 2, h, w).transpose(1, 2).contiguous().view(n, ch, h, w)
        p, q = y.chunk(2, dim=1)
        z = torch.cat([p, F.relu(self.c(q))], 1)
        return self.d(z)


class PReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.act = nn.PReLU(12)
        self.b = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


class InstanceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.n = nn.InstanceNorm2d(12, affine=True)
        self.b = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.n(self.a(x))))


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, idx):
        return self.fc(F.relu(self.emb(idx))).mean(1)


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize(
    "net",
    [
        Residual,
        SqueezeExcite,
        Concat,
        SplitChunk,
        FlattenLinear,
        ViewLinear,
        PermuteLinear,
        Depthwise,
        Grouped,
        Shuffle,
        PReLUNet,
        InstanceNet,
    ],
)
def test_zeroed_channel_equivalence(net):
    assert_equivalent(net(), X)


def test_embedding_equivalence():
    idx = torch.randint(0, 50, (2, 7))
    ca, g = assert_equivalent(EmbeddingNet(), idx)
    assert g.module.emb.weight.shape[1] < 16


def test_residual_couples_stem_and_block_output():
    g = graphopt.trace(Residual().eval(), X)
    ca = ChannelAnalysis(g)
    owners = [set(grp.producers) for grp in ca.groups]
    assert {"stem.0", "a.3"} in owners  # the add ties the stem to the block's last conv
    assert {"a.0"} in owners


def test_concat_offsets_map_to_consumer_columns():
    torch.manual_seed(1)
    ca, g = assert_equivalent(Concat(), X)
    assert (
        g.module.d.in_channels
        == g.module.a.out_channels + g.module.b.out_channels + g.module.c.out_channels
    )


def test_grouped_conv_keeps_groups_even():
    ca, g = assert_equivalent(Grouped(), X)
    conv = g.module.g
    assert conv.groups == 4
    assert conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    assert conv.in_channels < 16 and conv.out_channels < 24


def test_depthwise_follows_its_input():
    ca, g = assert_equivalent(Depthwise(), X)
    dw = g.module.dw
    assert dw.groups == dw.in_channels == g.module.pw1.out_channels
    assert dw.out_channels == 2 * dw.in_channels


def test_channel_slice_moves_its_bounds():
    class Slices(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 1)
            self.b = nn.Conv2d(6, 4, 1)
            self.c = nn.Conv2d(5, 4, 1)
            self.e = nn.Conv2d(3, 8, 1)
            self.d = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = F.relu(self.a(x))
            z = self.b(y[:, 2:8]) + self.c(y[:, 11:])
            return z + self.d(F.relu(self.e(x))[:, ::2])  # strided: e stays whole

    ca, g = assert_equivalent(Slices(), X, min_removed_params=0.0)
    m = g.module
    assert m.b.in_channels < 6 and m.c.in_channels < 5
    assert m(X).shape == (2, 4, 8, 8)
    producers = {p for grp in ca.groups for p in grp.producers}
    assert "a" in producers and "e" not in producers


def test_channel_slice_pruned_by_the_pass():
    g = graphopt.trace(randomize_bn(ChannelSlice()), X)
    r = graphopt.Pipeline.parse("prune(ratio=0.5)").run(g)
    m = r.graph.module
    assert m.a.out_channels < 16 and m.b.in_channels < 8
    assert m(X).shape == (2, 4, 8, 8)


def test_shape_read_from_another_tensor_locks_both():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(3, 8, 1)
            self.c = nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(8, 4)
            self.d = nn.Conv2d(3, 6, 1)
            self.e = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            y = F.relu(self.a(x))
            n, c, h, w = y.shape
            z = F.relu(self.b(x)).reshape(n, c, h * w).mean(2)  # b's width read from y
            return self.fc(z) + self.c(y).mean((2, 3)) + self.e(F.relu(self.d(x))).mean((2, 3))

    g = graphopt.trace(Net().eval(), X)
    r = graphopt.Pipeline.parse("prune(ratio=0.5)").run(g)
    m = r.graph.module
    assert m.a.out_channels == m.b.out_channels == 8
    assert m.d.out_channels == 3
    assert any("shape read from" in x["reason"] for x in r.reports[0].details["locked"])


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_norms_with_statistics_prune_consistently(norm):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.n = nn.GroupNorm(4, 16) if norm == "group" else nn.Identity()
            self.fc1 = nn.Linear(16, 16)
            self.ln = nn.LayerNorm(16)
            self.fc2 = nn.Linear(16, 3)

        def forward(self, x):
            x = F.relu(self.n(self.a(x))).mean((2, 3))
            return self.fc2(self.ln(self.fc1(x)))

    g = graphopt.trace(Net().eval(), X)
    r = graphopt.Pipeline.parse("prune(ratio=0.5)").run(g)
    m = r.graph.module
    if norm == "group":
        assert m.n.num_channels == m.a.out_channels < 16 and m.n.num_channels % 4 == 0
    assert m.ln.normalized_shape == (m.fc1.out_features,) and m.fc1.out_features < 16
    assert r.graph.module(X).shape == (2, 3)


class AttentionBlock(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_heads_prune_exactly(batch_first):
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    ref, out, ca, g = zero_and_remove(AttentionBlock(batch_first), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    attn = g.module.attn
    assert isinstance(attn, SelfAttention)
    assert attn.num_heads == 2 and attn.head_dim == 4  # whole heads removed, head width kept
    assert g.module.fc1.out_features == 16


def test_attention_width_and_heads_through_the_pass():
    x = torch.randn(2, 5, 16)
    g = graphopt.trace(AttentionBlock().eval(), x)
    r = graphopt.Pipeline.parse("prune(ratio=0.5)").run(g)
    attn = r.graph.module.attn
    assert isinstance(attn, SelfAttention)
    assert attn.embed_in == attn.embed_out == 16  # the residual stream is the model input: locked
    assert attn.num_heads == 2
    assert r.graph.module(x).shape == (2, 5, 3)


def test_cross_attention_stays_whole():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(16, 16)
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            return self.out(self.attn(self.q(x), x, x, need_weights=False)[0])

    g = graphopt.trace(Cross().eval(), torch.randn(2, 5, 16))
    ca = ChannelAnalysis(g)
    assert not any("attn" in p for grp in ca.groups for p in grp.producers)


# -- the pass ---------------------------------------------------------------------------------------------
def test_ratio_zero_leaves_graph_identical():
    g = graphopt.trace(randomize_bn(Residual()), X)
    before = {k: v.clone() for k, v in g.module.state_dict().items()}
    code = g.module.code
    r = graphopt.Pipeline.parse("prune(ratio=0)").run(g)
    assert not r.reports[0].modified
    assert r.graph.module.code == code
    after = r.graph.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("importance", ["l1", "l2", "bn-scale", "random"])
def test_importances_shrink_and_run(importance):
    g = graphopt.trace(randomize_bn(Residual()), X)
    r = graphopt.Pipeline.parse(f"prune(ratio=0.5,importance={importance})").run(g)
    rep = r.reports[0]
    assert rep.modified
    assert rep.details["params_after"] < rep.details["params_before"]
    assert r.graph.module(X).shape == (2, 5)


def test_bn_scale_leaves_groups_without_norm_whole():
    g = graphopt.trace(SqueezeExcite().eval(), X)
    r = graphopt.Pipeline.parse("prune(ratio=0.5,importance=bn-scale)").run(g)
    rep = r.reports[0]
    assert not rep.modified
    assert rep.details["skipped"] and all("bn-scale" in s["reason"] for s in rep.details["skipped"])


def test_l2_removes_the_weakest_channels():
    net = FlattenLinear().eval()
    with torch.no_grad():
        net.fc.weight[:5] *= 1e-3  # five hidden units with tiny weights
    g = graphopt.trace(net, X)
    r = graphopt.Pipeline.parse("prune(ratio=0.25,importance=l2,reduce=sum)").run(g)
    kept = r.graph.module.fc.weight
    assert kept.shape[0] == 15
    assert kept.abs().sum(1).min() > 1e-2  # all tiny rows gone


def test_taylor_needs_data_and_uses_it():
    g = graphopt.trace(randomize_bn(Residual()), X)
    with pytest.raises(DataError, match="'prune' needs data"):  # before anything runs
        graphopt.Pipeline.parse("prune(importance=taylor)").run(g)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))) for _ in range(2)]
    r = graphopt.Pipeline.parse("prune(importance=taylor,ratio=0.5)").run(g, data=data)
    assert r.reports[0].modified


def test_global_scope_and_round_to():
    g = graphopt.trace(randomize_bn(Concat()), X)
    r = graphopt.Pipeline.parse("prune(ratio=0.5,scope=global,round-to=2)").run(g)
    assert r.reports[0].modified
    assert r.graph.module(X).shape[1] == 3


def test_ignore_glob_keeps_layer_and_warns_on_no_match(caplog):
    g = graphopt.trace(randomize_bn(Residual()), X)
    with caplog.at_level(logging.WARNING):
        r = graphopt.Pipeline.parse("prune(ratio=0.5,ignore=[a.0,nothing.*])").run(g)
    assert r.graph.module.get_submodule("a.0").out_channels == 8
    assert any("nothing.*" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("kind,frac", [("macs", 0.5), ("params", 0.4)])
def test_target_is_met_within_2_percent(kind, frac):
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()
    g = graphopt.trace(net, torch.randn(1, 3, 8, 8))
    base = graphopt.cost_of(g).to_dict()[kind]
    r = graphopt.Pipeline.parse(f"prune(target={kind}:{frac})").run(g)
    kept = graphopt.cost_of(r.graph).to_dict()[kind] / base
    assert abs(kept - frac) <= 0.02 * frac
    assert r.reports[0].details["target_search"]["kept"] == pytest.approx(kept)


def test_steps_iterative():
    g = graphopt.trace(randomize_bn(Residual()), X)
    r = graphopt.Pipeline.parse("prune(ratio=0.5,steps=2)").run(g)
    assert r.graph.module.get_submodule("a.0").out_channels in (4, 5)


@pytest.mark.parametrize(
    "text,msg",
    [
        ("prune(ratio=1.0)", "ratio must be in"),
        ("prune(ratio=-0.1)", "ratio must be in"),
        ("prune(target=flops:0.5)", "target must be"),
        ("prune(importance=hessian)", "must be one of"),
    ],
)
def test_bad_options(text, msg):
    with pytest.raises(OptionError, match=msg):
        graphopt.Pipeline.parse(text)


def test_unreachable_target():
    g = graphopt.trace(randomize_bn(Residual()), X)
    with pytest.raises(PassFailure, match="cannot be met"):
        graphopt.Pipeline.parse("prune(target=macs:0.01,max-ratio=0.2)").run(g)


def test_training_mode_refused():
    g = graphopt.trace(Residual().train(), X)
    with pytest.raises(PassFailure, match="training mode"):
        graphopt.Pipeline.parse("prune").run(g)


def test_removing_locked_unit_is_refused():
    g = graphopt.trace(Residual().eval(), X)
    ca = ChannelAnalysis(g)
    locked = np.nonzero(~ca.unit_prunable)[0][:1]
    with pytest.raises(GraphoptError, match="locked"):
        remove_units(g, ca, locked)


# -- plan replay ------------------------------------------------------------------------------------------
def test_plan_replay_loads_checkpoint(tmp_path):
    torch.manual_seed(3)
    model = randomize_bn(Residual())
    g = graphopt.trace(model, X)
    r = graphopt.Pipeline.parse("prune(ratio=0.5)").run(g, out_dir=tmp_path)
    plan_path = tmp_path / "prune_plan.json"
    assert plan_path.exists()
    plan = json.loads(plan_path.read_text())
    fresh = Residual().eval()
    apply_plan(fresh, plan)
    fresh.load_state_dict(r.graph.module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), r.graph.module(X))


def test_plan_for_other_architecture_is_refused():
    plan = {
        "format": "graphopt-prune-plan",
        "version": 1,
        "rounds": [
            {"round": 1, "members": [{"owner": "zz", "param": "weight", "dim": 0, "removed": [0]}]}
        ],
    }
    with pytest.raises(GraphoptError, match="no module 'zz'"):
        apply_plan(Residual(), plan)


@pytest.mark.parametrize("index", [16, -1])
def test_plan_indices_outside_the_tensor_are_refused(index):
    """A plan entry removing slice 16 of a 16-channel conv (or a negative index) names the
    tensor instead of failing inside torch or wrapping around."""
    member = {"owner": "stem.0", "param": "weight", "dim": 0, "removed": [0, index]}
    plan = {"format": "graphopt-prune-plan", "version": 1, "rounds": [{"members": [member]}]}
    model = Residual()
    with pytest.raises(GraphoptError, match=r"stem\.0\.weight has 16 slices.*outside 0\.\.15"):
        apply_plan(model, plan)
    assert model.stem[0].weight.shape[0] == 16


# -- random architectures ---------------------------------------------------------------------------------
class RandomNet(nn.Module):
    """A random mix of residual, concat, split, grouped conv and flatten blocks."""

    def __init__(self, ops: list[str], width: int):
        super().__init__()
        self.ops = ops
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.layers = nn.ModuleList()
        c = width
        for op in ops:
            if op == "res":
                self.layers.append(
                    nn.Sequential(
                        nn.Conv2d(c, c, 3, padding=1),
                        nn.BatchNorm2d(c),
                        nn.ReLU(),
                        nn.Conv2d(c, c, 1),
                    )
                )
            elif op == "cat":
                self.layers.append(nn.Conv2d(c, 4, 1))
                c += 4
            elif op == "split":
                self.layers.append(nn.Conv2d(c - c // 2, c - c // 2, 1))
            elif op == "group":
                self.layers.append(
                    nn.Conv2d(c, 2 * c, 3, padding=1, groups=c // 2 if c % 2 == 0 else 1)
                )
                c = 2 * c
        self.head = nn.Linear(c * 4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for op, layer in zip(self.ops, self.layers):
            if op == "res":
                x = F.relu(x + layer(x))
            elif op == "cat":
                x = torch.cat([x, F.relu(layer(x))], 1)
            elif op == "split":
                a, b = torch.split(x, [x.shape[1] // 2, x.shape[1] - x.shape[1] // 2], dim=1)
                x = torch.cat([a, F.relu(layer(b))], 1)
            else:
                x = F.relu(layer(x))
        x = F.adaptive_avg_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(["res", "cat", "split", "group"]), min_size=1, max_size=5),
    st.sampled_from([4, 6, 8]),
)
def test_random_architectures_prune_exactly(ops, width):
    torch.manual_seed(0)
    net = RandomNet(ops, width)
    x = torch.randn(2, 3, 6, 6)
    ref, out, ca, g = zero_and_remove(net, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-7)
    r = graphopt.Pipeline.parse("prune(ratio=0.5)").run(graphopt.trace(net.eval(), x))
    assert r.graph.module(x).shape == (2, 3)


def test_data_error_type():
    assert issubclass(DataError, GraphoptError)


# -- lowering ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net,x", [(Shuffle, X), (AttentionBlock, torch.randn(2, 5, 16))])
def test_pruned_graph_exports_and_matches_ort(tmp_path, net, x):
    from graphopt.backends import onnxruntime as ort_backend

    g = graphopt.trace(randomize_bn(net()), x)
    r = graphopt.Pipeline.parse("prune(ratio=0.5)").run(g)
    assert r.reports[0].modified
    path = ort_backend.export(r.graph, tmp_path / "pruned.onnx")
    parity = ort_backend.check_parity(r.graph, path, inputs=(x,))
    assert parity["ok"], parity


def test_between_runs_distillation_between_rounds():
    from graphopt.zoo.datasets import load_data
    from graphopt.zoo.models import load_model

    model, _ = load_model("digits:vgg")
    data = load_data("digits")
    x = (data.train[0][0][:8],)
    plain = graphopt.compress(model, "fold-bn,prune(ratio=0.75,steps=3)", example_inputs=x)
    text = 'fold-bn,prune(ratio=0.75,steps=3,between="distill(epochs=2)")'
    assert str(graphopt.Pipeline.parse(text)) == text
    result = graphopt.compress(model, text, example_inputs=x, data=data.train)
    between = result.reports[-1].details["between"]
    assert [b["after_round"] for b in between] == [1, 2]
    for b in between:
        (d,) = b["passes"]
        assert d["name"] == "distill" and d["details"]["loss_last"] < d["details"]["loss_first"]
    shapes = {k: v.shape for k, v in plain.graph.module.state_dict().items()}
    assert {k: v.shape for k, v in result.graph.module.state_dict().items()} == shapes
    with pytest.raises(OptionError, match="between needs steps >= 2"):
        graphopt.Pipeline.parse('prune(between="distill")')
    with pytest.raises(DataError, match="'prune' needs data"):
        graphopt.compress(model, text, example_inputs=x)


def test_a_ratio_above_max_ratio_is_capped_and_says_so():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3)).eval()
    g = graphopt.trace(model, torch.randn(1, 3, 10, 10))
    rep = graphopt.Pipeline.parse("prune(ratio=0.95)").run(g).reports[0].details
    assert "capped at max-ratio" in rep["summary"] and "max-ratio" in rep["capped"]
    assert g.module.get_submodule("0").out_channels == 16 - int(16 * 0.9)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.sampled_from([1, 2]),
    st.data(),
)
def test_slice_scores_are_per_slice_norms(shape, p, data):
    """The shared-plane path (dims 0 and 1) and the direct path give Σ|x|^p per slice."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    dim = data.draw(st.integers(0, len(shape) - 1))
    planes: dict = {}
    got = _slice_scores(t, dim, p, planes)
    x = t.double().abs() ** p
    others = [d for d in range(t.dim()) if d != dim]
    want = x.sum(dim=others) if others else x
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    if t.dim() > 2 and dim < 2:  # the other dim reuses the same plane
        np.testing.assert_allclose(
            _slice_scores(t, 1 - dim, p, planes),
            x.sum(dim=[d for d in range(t.dim()) if d != 1 - dim]).numpy(),
            rtol=1e-5,
        )
        assert [k for k in planes if k != "scratch"] == [(id(t), p)]  # one entry: reused
