"""The export front end's own unlifting (parameters, buffers and tensor constants read by
get_attr from the user's deep-copied model) against ``ExportedProgram.module()``, and the
fallback to it for programs that mutate buffers."""

from __future__ import annotations

import torch
import torch.nn as nn

import graphopt


class WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("offset", torch.arange(4.0))

    def forward(self, x):
        return torch.relu(self.fc(x)) + self.offset * torch.tensor([1.0, -2.0, 3.0, -4.0])


class Counting(nn.Module):
    """A forward that writes a buffer: export lists a buffer mutation."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x)


def test_parameters_buffers_and_constants_are_read_from_the_model():
    model = WithConstant().eval()
    x = torch.randn(3, 4)
    g = graphopt.trace(model, x, frontend="export")
    assert g.trace_report["frontend"] == "export"
    assert torch.equal(g.module(x), model(x))
    assert [n.target for n in g.module.graph.nodes if n.op == "call_module"] == ["fc"]
    assert g.module.fc.weight is not model.fc.weight  # a copy, the user's model untouched
    assert torch.equal(g.module.fc.weight, model.fc.weight)
    assert not any(n.op == "placeholder" and "offset" in n.name for n in g.module.graph.nodes)
    model.fc.weight.data.zero_()  # the traced graph owns its own parameters
    assert not torch.equal(g.module(x), model(x))


def test_a_program_that_mutates_a_buffer_still_traces():
    model = Counting().eval()
    x = torch.randn(2, 4)
    ref = model.fc(x)
    calls = model.calls.clone()
    g = graphopt.trace(model, x, frontend="export")
    assert torch.allclose(g.module(x), ref)
    assert torch.equal(model.calls, calls)  # tracing ran a copy
