"""``remove-identity``: Identity, eval-mode Dropout, functional dropout and stochastic depth that
cannot fire are removed with the outputs bit-for-bit unchanged; an active Dropout is kept and
reported."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth, stochastic_depth

import graphopt

_NOOP_TYPES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.id = nn.Identity()
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout2d(0.3)
        self.alpha = nn.AlphaDropout(0.2)
        self.sd = StochasticDepth(0.2, "row")  # calls the fx-wrapped stochastic_depth
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        y = self.id(self.fc1(x))
        y = self.drop(y).relu()
        y = self.drop2d(y.unsqueeze(-1).unsqueeze(-1)).flatten(1)
        y = F.dropout(y, 0.4, training=self.training)
        y = self.sd(y)
        return self.fc2(self.alpha(y))


def run(model: nn.Module, x: torch.Tensor, pipeline: str = "remove-identity"):
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        ref = model(x)
    graph = graphopt.trace(model, x)
    n_before = len(graph.nodes)
    result = graphopt.Pipeline.parse(pipeline).run(graph)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        out = result.graph.module(x)
    return result, result.reports[0], out, ref, n_before


def test_identity_and_eval_dropout_are_removed():
    model = Net().eval()
    result, report, out, ref, n_before = run(model, torch.randn(3, 8))
    assert torch.equal(out, ref)
    assert report.modified and report.verified
    d = report.details
    assert sorted(d["removed"]) == sorted(
        ["id", "drop", "drop2d", "dropout", "stochastic_depth", "alpha"]
    )
    assert d["kept"] == []
    gm = result.graph.module
    assert len(result.graph.nodes) == n_before - 6
    assert not any(isinstance(m, _NOOP_TYPES) for m in gm.modules())
    assert not any(
        n.op == "call_function" and n.target in (F.dropout, stochastic_depth)
        for n in gm.graph.nodes
    )


def test_training_mode_dropout_is_kept_and_reported():
    model = Net().eval()
    model.drop.train()
    result, report, out, ref, _ = run(model, torch.randn(3, 8))
    gm = result.graph.module
    assert torch.equal(out, ref)  # same seed, same dropout mask
    assert isinstance(gm.get_submodule("drop"), nn.Dropout)
    assert any(n.op == "call_module" and n.target == "drop" for n in gm.graph.nodes)
    d = report.details
    assert "drop" not in d["removed"]
    assert d["kept"] == [{"node": "drop", "reason": "Dropout(p=0.5) is in training mode"}]
    assert len(d["removed"]) == 5  # everything else still goes


def test_training_mode_dropout_with_p_zero_is_removed():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), nn.ReLU()).eval()
    model[1].train()
    result, report, out, ref, _ = run(model, torch.randn(2, 4))
    assert torch.equal(out, ref)
    assert report.details["removed"] == ["1"]


def test_functional_dropout_in_training_is_kept():
    class M(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5, training=True) + 1

    result, report, out, ref, _ = run(M(), torch.randn(4, 4))
    assert torch.equal(out, ref)
    assert report.modified is False
    assert report.details["kept"] == [
        {"node": "dropout", "reason": "dropout with training=True and p=0.5 is active"}
    ]


def test_identity_feeding_the_output_and_several_users():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.id = nn.Identity()

        def forward(self, x):
            y = self.id(x * 2)
            return y + 1, self.id(y)

    result, report, out, ref, _ = run(M().eval(), torch.randn(3))
    assert report.details["removed"] == ["id", "id"]
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert not hasattr(result.graph.module, "id")


def test_clean_graph_is_not_modified():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    result, report, out, ref, n_before = run(model, torch.randn(2, 4))
    assert report.modified is False
    assert report.details == {"removed": [], "kept": [], "summary": report.details["summary"]}
    assert len(result.graph.nodes) == n_before
