"""``dce``: dead nodes go, and with them the submodules and parameters nothing uses; live code,
in-place mutations included, stays; a clean graph is left alone."""

from __future__ import annotations

import torch
import torch.nn as nn

import graphopt


def run_dce(model: nn.Module, x: torch.Tensor):
    model = model.eval()
    with torch.no_grad():
        ref = model(x)
    graph = graphopt.trace(model, x)
    result = graphopt.Pipeline.parse("dce").run(graph)
    with torch.no_grad():
        out = result.graph.module(x)
    return result, result.reports[0], out, ref


class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.unused = nn.Conv2d(3, 8, 1)  # only feeds a dead branch
        self.scale = nn.Parameter(torch.randn(1, 4, 1, 1))  # root-level, only read by dead code
        self.register_buffer("offset", torch.randn(4, 1, 1))  # root-level buffer, dead too

    def forward(self, x):
        y = self.conv(x)
        dead = self.unused(x).relu() * 2  # noqa: F841 (computed, never used)
        dead2 = y * self.scale + self.offset  # noqa: F841
        return y.sigmoid()


def test_dead_branch_submodule_and_parameter_are_removed():
    model = DeadBranch()
    graph0 = graphopt.trace(model.eval(), torch.randn(1, 3, 8, 8))
    # before: the dead code and the state it reads are in the traced graph
    assert {"unused", "scale", "offset"} <= {n.target for n in graph0.nodes}
    assert hasattr(graph0.module, "unused") and hasattr(graph0.module, "scale")

    result, report, out, ref = run_dce(model, torch.randn(1, 3, 8, 8))
    gm = result.graph.module
    assert report.modified and report.verified
    assert torch.equal(out, ref)
    d = report.details
    assert {"unused", "relu", "mul", "scale", "offset", "mul_1", "add"} <= set(d["removed_nodes"])
    assert d["removed_modules"] == ["unused"]
    assert sorted(d["removed_parameters"]) == ["offset", "scale"]
    assert not hasattr(gm, "unused") and not hasattr(gm, "scale") and not hasattr(gm, "offset")
    assert "scale" not in dict(gm.named_parameters())
    assert "offset" not in dict(gm.named_buffers())
    # what is live stays
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_method", "output"]
    assert hasattr(gm, "conv")
    assert sum(p.numel() for p in gm.parameters()) == sum(
        p.numel() for p in model.conv.parameters()
    )


def test_clean_graph_is_not_modified():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    x = torch.randn(1, 3, 6, 6)
    result, report, out, ref = run_dce(model, x)
    assert report.modified is False
    assert report.details["removed_nodes"] == []
    assert report.details["removed_modules"] == []
    assert report.details["removed_parameters"] == []
    assert len(result.graph.nodes) == 6
    assert torch.equal(out, ref)


def test_resnet18_is_clean():
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    _, report, out, ref = run_dce(model, torch.randn(1, 3, 32, 32))
    assert report.modified is False
    assert torch.equal(out, ref)


def test_dead_parameter_of_a_traced_through_container_is_removed():
    """``block`` stays (its conv is called) but its own dead parameter goes."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.gate = nn.Parameter(torch.randn(3, 1, 1))

        def forward(self, x):
            _ = x * self.gate
            return self.conv(x)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)

    result, report, out, ref = run_dce(M(), torch.randn(1, 3, 4, 4))
    assert report.details["removed_parameters"] == ["block.gate"]
    assert not hasattr(result.graph.module.block, "gate")
    assert hasattr(result.graph.module.block, "conv")
    assert torch.equal(out, ref)


def test_in_place_operations_are_not_dead():
    """``y.add_(1)`` and ``torch.relu_(y)`` have no users but mutate ``y``, which is returned."""

    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(1)
            torch.relu_(y)
            y.clamp_(max=2.0)
            return y

    result, report, out, ref = run_dce(M(), torch.randn(2, 3))
    assert report.modified is False, report.details
    assert torch.equal(out, ref)
    targets = {str(n.target) for n in result.graph.nodes}
    assert {"add_", "clamp_"} <= targets and any("relu_" in t for t in targets)


def test_in_place_module_without_users_is_not_dead():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.act = nn.ReLU(inplace=True)
            self.side = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            self.act(y)  # result unused, but y is clamped in place
            self.side(y)  # result unused and pure: dead
            return y

    result, report, out, ref = run_dce(M(), torch.randn(1, 3, 4, 4))
    assert torch.equal(out, ref)
    assert report.details["removed_nodes"] == ["side"]
    assert report.details["removed_modules"] == ["side"]
    assert hasattr(result.graph.module, "act")
