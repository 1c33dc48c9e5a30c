"""Cross-layer equalization: exact in float, balances channel ranges, helps int8."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.manager import Pipeline
from graphopt.passes.qdq import QDQ
from graphopt.passes.qdq.equalize import equalize, find_pairs
from graphopt.registry import Registry


class Separable(nn.Module):
    """Pointwise -> depthwise -> pointwise with BatchNorms whose scales span decades, as
    trained depthwise-separable nets have after BN folding."""

    def __init__(self, act=nn.ReLU, multiplier: int = 1):
        super().__init__()
        c = 16
        self.pw1 = nn.Conv2d(8, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.a1 = act()
        self.dw = nn.Conv2d(c, c * multiplier, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c * multiplier)
        self.a2 = act()
        self.pw2 = nn.Conv2d(c * multiplier, 4, 1)
        g = torch.Generator().manual_seed(1)
        for bn in (self.bn1, self.bn2):
            n = bn.num_features
            bn.weight.data = torch.exp(torch.randn(n, generator=g) * 1.5)
            bn.running_var.data = torch.rand(n, generator=g) + 0.1
            bn.bias.data = torch.randn(n, generator=g) * 0.1

    def forward(self, x):
        x = self.a1(self.bn1(self.pw1(x)))
        return self.pw2(self.a2(self.bn2(self.dw(x))))


def _folded(model: nn.Module) -> graphopt.Graph:
    x = torch.randn(1, 8, 10, 10)
    return graphopt.compress(model.eval(), "fold-bn", example_inputs=(x,)).graph


@pytest.mark.parametrize("multiplier", [1, 2])
def test_equalization_is_exact_and_balances_ranges(multiplier):
    graph = _folded(Separable(multiplier=multiplier))
    gm = copy.deepcopy(graph.module)
    report = equalize(gm)
    assert [(p["first"], p["second"], p["through"]) for p in report["pairs"]] == [
        ("pw1", "dw", "relu"),
        ("dw", "pw2", "relu"),
    ]
    for p in report["pairs"]:
        assert p["spread_after"] < p["spread_before"] / 10
    x = torch.randn(8, 8, 10, 10)
    with torch.no_grad():
        want, got = graph.module(x), gm(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_relu6_pairs_are_refused():
    pairs, refused = find_pairs(_folded(Separable(act=nn.ReLU6)).module)
    assert pairs == []
    assert refused and "not scale-equivariant" in refused[0]["reason"]


def test_equalize_improves_int8():
    reg = Registry()
    reg.add(QDQ)
    graph = _folded(Separable())
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 8, 10, 10, generator=g) for _ in range(4)]

    def worst_sqnr(text: str) -> float:
        result = Pipeline.parse(text, registry=reg).run(graph.copy(), data=data)
        return min(row["sqnr_db"] for row in result.reports[-1].details["layers"])

    assert (
        worst_sqnr("qdq(weights=per-tensor,equalize=true)")
        > worst_sqnr("qdq(weights=per-tensor)") + 2.0
    )
    assert worst_sqnr("qdq(equalize=true)") > worst_sqnr("qdq")
