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


class Upsampler(nn.Module):
    """Transposed convs of every rank, with groups, dilation and output padding; ``sized``
    calls one with ``output_size``, which changes its output padding at call time."""

    def __init__(self, sized: bool = False):
        super().__init__()
        self.sized = sized
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.up1 = nn.ConvTranspose1d(8, 4, 2, stride=2, dilation=2, bias=False)
        self.up3 = nn.ConvTranspose3d(1, 2, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):
        h = torch.relu(self.down(x))
        if self.sized:
            h = self.up2(h, output_size=[x.shape[2] - 1, x.shape[3] - 1])
        else:
            h = self.up2(h)
        h = torch.relu(self.bn(h))
        a = self.up1(h.flatten(2))
        b = self.up3(h[:, :1].unsqueeze(1))
        return a.mean(-1), b.flatten(1).mean(-1)


def _randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def test_transposed_convs_are_lifted_to_their_modules():
    model = _randomized(Upsampler())
    x = torch.randn(2, 3, 10, 10)
    g = graphopt.trace(model, x, frontend="export")
    calls = {str(n.target) for n in g.module.graph.nodes if n.op == "call_module"}
    assert {"up1", "up2", "up3", "bn"} <= calls
    assert not [n for n in g.module.graph.nodes if "conv_transpose" in str(n.target)]
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 10, 10)
        for got, want in zip(g.module(xb), model(xb)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    r = graphopt.Pipeline.parse("fold-bn").run(g)
    assert r.reports[0].modified and r.reports[0].verified  # bn folds into up2 exactly
    assert "bn" not in {str(n.target) for n in g.module.graph.nodes if n.op == "call_module"}


def test_a_transposed_conv_called_with_output_size_stays_an_aten_call():
    model = _randomized(Upsampler(sized=True))
    x = torch.randn(2, 3, 10, 10)
    g = graphopt.trace(model, x, frontend="export")
    calls = {str(n.target) for n in g.module.graph.nodes if n.op == "call_module"}
    assert "up2" not in calls and {"up1", "up3"} <= calls
    for got, want in zip(g.module(x), model(x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
