"""Coupling rules of the channel analysis, one small hand-built model each: the units a rule
must tie together (checked through each member's parameter-index -> unit map) and the locks
with their reasons."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.channels import ChannelAnalysis, Member
from graphopt.channels.rules_shapes import _refine, _reshape_groups

X = torch.randn(2, 3, 6, 6)


def analyse(model: nn.Module, x: torch.Tensor = X) -> ChannelAnalysis:
    return ChannelAnalysis(graphopt.trace(model.eval(), x))


def member(ca: ChannelAnalysis, owner: str, kind: str, param: str = "weight") -> Member:
    found = [m for m in ca.members if (m.owner, m.param, m.kind) == (owner, param, kind)]
    assert len(found) == 1, f"{owner}.{param} ({kind}): {len(found)} members"
    return found[0]


def units(ca: ChannelAnalysis, owner: str, kind: str, param: str = "weight") -> np.ndarray:
    return ca.units_of(member(ca, owner, kind, param))


def group_of(ca: ChannelAnalysis, producer: str):
    found = [g for g in ca.groups if producer in g.producers]
    assert len(found) == 1, f"{producer}: in {len(found)} groups"
    return found[0]


def test_residual_add_couples_both_producers_channel_by_channel():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(F.relu(self.a(x) + self.b(x)))

    ca = analyse(Net())
    ua, ub, uc = units(ca, "a", "out"), units(ca, "b", "out"), units(ca, "c", "in")
    assert len(set(ua.tolist())) == 8  # every channel its own unit
    np.testing.assert_array_equal(ua, ub)
    np.testing.assert_array_equal(ua, uc)
    g = group_of(ca, "a")
    assert g.producers == ["a", "b"] and g.size == 8
    assert sorted(g.units.tolist()) == sorted(ua.tolist())


def test_concat_offsets_place_each_input_after_the_previous():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 5, 1), nn.Conv2d(3, 7, 1)
            self.c = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), F.relu(self.b(x))], dim=1))

    ca = analyse(Net())
    uc = units(ca, "c", "in")
    np.testing.assert_array_equal(uc[:5], units(ca, "a", "out"))
    np.testing.assert_array_equal(uc[5:], units(ca, "b", "out"))
    assert not set(units(ca, "a", "out").tolist()) & set(units(ca, "b", "out").tolist())
    assert group_of(ca, "a").size == 5 and group_of(ca, "b").size == 7


def test_depthwise_conv_couples_each_input_channel_with_its_outputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(3, 6, 1)
            self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)  # multiplier 2
            self.out = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            return self.out(F.relu(self.dw(F.relu(self.pw(x)))))

    ca = analyse(Net())
    upw, udw = units(ca, "pw", "out"), units(ca, "dw", "out")
    np.testing.assert_array_equal(udw, upw[np.arange(12) // 2])
    np.testing.assert_array_equal(units(ca, "out", "in"), udw)
    g = group_of(ca, "pw")
    assert g.producers == ["dw", "pw"] and g.size == 6
    assert any(r.kind == "depthwise" and r.info["path"] == "dw" for r in ca.rewrites)


def test_grouped_conv_couples_the_same_position_of_every_group():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.g = nn.Conv2d(8, 12, 1, groups=4)
            self.out = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            return self.out(F.relu(self.g(F.relu(self.a(x)))))

    ca = analyse(Net())
    ua, ug = units(ca, "a", "out"), units(ca, "g", "out")
    np.testing.assert_array_equal(ua, ua[np.arange(8) % 2])  # 2 in-group positions
    np.testing.assert_array_equal(ug, ug[np.arange(12) % 3])  # 3 out-group positions
    assert group_of(ca, "a").size == 2 and group_of(ca, "g").size == 3


def test_flatten_into_linear_maps_a_channel_to_its_block_of_features():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)  # 6x6 -> 4x4: 16 features per channel
            self.fc = nn.Linear(64, 5)

        def forward(self, x):
            return self.fc(torch.flatten(F.relu(self.conv(x)), 1))

    ca = analyse(Net())
    uconv, ufc = units(ca, "conv", "out"), units(ca, "fc", "in")
    np.testing.assert_array_equal(ufc, uconv[np.arange(64) // 16])
    assert any(r.kind == "merge" for r in ca.rewrites)
    assert group_of(ca, "conv").size == 4


def test_split_gives_each_piece_its_slice_of_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b, self.c = nn.Conv2d(5, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            p, q = torch.split(self.a(x), [5, 3], dim=1)
            return self.b(p) + self.c(q.relu())

    ca = analyse(Net())
    ua = units(ca, "a", "out")
    np.testing.assert_array_equal(units(ca, "b", "in"), ua[:5])
    np.testing.assert_array_equal(units(ca, "c", "in"), ua[5:])
    assert [r.info for r in ca.rewrites if r.kind == "split"] == [{"dim": 1}]
    # the two pieces reach different spaces: one group each, ranked separately
    assert sorted(g.size for g in ca.groups if "a" in g.producers) == [3, 5]


def test_unknown_op_locks_its_channels_and_says_why():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.c, self.d = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(torch.cumsum(self.a(x), 1)) + self.d(F.relu(self.b(x)))

    ca = analyse(Net())
    assert all(ca.unit_locked[units(ca, "a", "out")])
    assert not any(ca.unit_locked[units(ca, "b", "out")])
    reasons = {row["layer"]: row["reason"] for row in ca.locked_summary(limit=0)}
    assert "cumsum" in reasons["a"] and "is not understood" in reasons["a"]
    assert "b" not in reasons
    assert reasons["c"] == reasons["d"] == "model output"
    assert [g.producers for g in ca.groups] == [["b"]]


def test_norm_statistics_mark_the_group():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.gn = nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8)
            self.b, self.bn = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
            self.c, self.d = nn.Conv2d(8, 4, 1), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.c(self.gn(self.a(x))) + self.d(self.bn(self.b(x)))

    ca = analyse(Net())
    ua = units(ca, "a", "out")
    np.testing.assert_array_equal(ua, ua[np.arange(8) % 4])  # same position in both groups
    np.testing.assert_array_equal(units(ca, "gn", "norm"), ua)
    np.testing.assert_array_equal(units(ca, "bn", "norm", "running_var"), units(ca, "b", "out"))
    assert group_of(ca, "a").stats_coupled and not group_of(ca, "b").stats_coupled


def test_channel_shuffle_couples_by_its_permutation():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            y = self.a(x)
            n, _, h, w = y.shape
            y = y.view(n, 2, 3, h, w).transpose(1, 2).reshape(n, 6, h, w)
            return self.b(y)

    ca = analyse(Net())
    ua, ub = units(ca, "a", "out"), units(ca, "b", "in")
    # [2, 3] -> [3, 2]: input channel g*3 + k is output channel k*2 + g; removal is rectangular
    # (the same k from both groups), so channel k*2+g of b reads a's channels k and k+3
    for g in range(2):
        for k in range(3):
            assert ub[k * 2 + g] == ua[g * 3 + k]
    np.testing.assert_array_equal(ua[:3], ua[3:])
    assert group_of(ca, "a").size == 3


def test_reshape_groups_pair_dims_whose_products_match():
    assert _reshape_groups((2, 6, 4), (2, 3, 2, 4)) == [([0], [0]), ([1], [1, 2]), ([2], [3])]
    assert _reshape_groups((2, 3, 4), (2, 12)) == [([0], [0]), ([1, 2], [1])]
    assert _reshape_groups((6, 4), (4, 6)) == [([0, 1], [0, 1])]  # many-to-many
    assert _reshape_groups((6,), (4,)) is None


class _Attention(nn.Module):
    def __init__(self, e=16, h=4):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = (
            p(x).view(b, t, self.h, e // self.h).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(a.transpose(1, 2).reshape(b, t, e))


def test_attention_heads_couple_q_k_v_rows_and_o_columns_per_head():
    ca = analyse(_Attention(), torch.randn(2, 5, 16))
    uq = units(ca, "q", "out")
    np.testing.assert_array_equal(uq, np.repeat(uq[::4], 4))  # a head's 4 rows: one unit
    assert len(set(uq[::4].tolist())) == 4  # four heads
    for owner, kind in (("k", "out"), ("v", "out"), ("o", "in")):
        np.testing.assert_array_equal(units(ca, owner, kind), uq)
    grp = group_of(ca, "q")
    assert grp.heads and grp.size == 4 and grp.producers == ["k", "q", "v"]
    # the head width is kept whole, and says why
    assert "kept whole" in " ".join(ca.lock_reasons.values())


def test_matmul_couples_the_contracted_dim_and_passes_rows_and_columns():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):  # [B, T, 8] @ [B, 8, T] -> [B, T, T], then @ [B, T, 8]
            s = torch.matmul(self.a(x), self.b(x).transpose(1, 2))
            return self.out(s @ self.c(x))

    ca = analyse(Net(), torch.randn(2, 5, 16))
    np.testing.assert_array_equal(units(ca, "a", "out"), units(ca, "b", "out"))
    np.testing.assert_array_equal(units(ca, "c", "out"), units(ca, "out", "in"))
    assert group_of(ca, "a").size == 8 and group_of(ca, "c").size == 8


def test_refine_factors_both_sides_of_a_reshape():
    assert _refine([2, 64], [8, 16]) == ([2, 4, 16], [(0, 1), (1, 3)], [(0, 2), (2, 3)])
    assert _refine([1, 12], [12]) == ([12], [(0, 0), (0, 1)], [(0, 1)])
    assert _refine([6, 4], [4, 6]) is None  # no common refinement
