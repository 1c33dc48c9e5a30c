"""Property tests: any pipeline text is parsed or refused with a one-line GraphoptError (never a
traceback), and random small conv/linear nets go through ``fold-bn,prune,qdq`` and export with
parity on fresh random inputs, not only on the example batch."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.app import cli
from graphopt.data import probe_inputs
from graphopt.errors import GraphoptError

NAMES = ["fold-bn", "dce", "prune", "qdq", "distill", "sparsify", "remove-identity", "fold-pad"]
OPTIONS = ["ratio", "importance", "epochs", "activations", "calibration", "skip", "between", "x"]
VALUES = ["0.5", "2", "-1", "l2", "taylor", "dynamic", "[a,b]", '"fold-bn,dce"', "true", "", "nan"]
PUNCT = [",", "(", ")", "=", " ", "[", "]", '"', "'", ";", "\\"]

token = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from(OPTIONS),
    st.sampled_from(VALUES),
    st.sampled_from(PUNCT),
)
pipeline_text = st.one_of(
    st.lists(token, max_size=14).map("".join),
    st.text(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(pipeline_text)
def test_any_pipeline_text_parses_or_is_refused_in_one_line(text):
    try:
        graphopt.Pipeline.parse(text)
    except GraphoptError as e:  # one line, or a syntax error's line with a caret under it
        lines = str(e).splitlines()
        assert lines and lines[0].strip() and "Traceback" not in str(e)
        assert len(lines) == 1 or (len(lines) == 3 and lines[2].strip() == "^"), str(e)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pipeline_text)
def test_the_cli_refuses_bad_pipeline_text_without_a_traceback(capsys, tmp_path, text):
    try:
        graphopt.Pipeline.parse(text)
        return  # valid texts would run a model; the parser case is what this checks
    except GraphoptError:
        pass
    code = cli.main(["run", "digits:vgg", "--pipeline", text, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), err
    assert not (tmp_path / "o").exists()


class RandomNet(nn.Module):
    """conv blocks (optional BN, optional residual) -> global pool -> linear."""

    def __init__(self, widths: list[int], kernels: list[int], bn: list[bool], residual: bool):
        super().__init__()
        layers, cin = [], 3
        for w, k, b in zip(widths, kernels, bn):
            block = [nn.Conv2d(cin, w, k, padding=k // 2, bias=not b)]
            block += [nn.BatchNorm2d(w)] if b else []
            layers.append(nn.Sequential(*block, nn.ReLU()))
            cin = w
        self.blocks = nn.ModuleList(layers)
        self.residual = residual and len(widths) >= 2 and widths[-1] == widths[-2]
        self.head = nn.Linear(cin, 5)

    def forward(self, x):
        prev = None
        for block in self.blocks:
            prev, x = x, block(x)
        if self.residual:
            x = x + prev
        return self.head(x.mean((2, 3)))


@st.composite
def nets(draw):
    n = draw(st.integers(1, 4))
    widths = draw(st.lists(st.sampled_from([2, 4, 6, 8]), min_size=n, max_size=n))
    kernels = draw(st.lists(st.sampled_from([1, 3]), min_size=n, max_size=n))
    bn = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    net = RandomNet(widths, kernels, bn, draw(st.booleans()))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval(), draw(st.sampled_from([0.25, 0.5]))


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(nets())
def test_random_nets_compress_and_export_with_parity_on_fresh_inputs(tmp_path, case):
    from graphopt.backends.onnxruntime import check_parity, export

    net, ratio = case
    x = torch.randn(2, 3, 8, 8)
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    fresh = probe_inputs((x,), seed=1)[1:]  # negated and random inputs, not the example
    g = graphopt.trace(net, x)
    graphopt.Pipeline.parse(f"fold-bn,prune(ratio={ratio})").run(g, data=data)
    path = export(g, tmp_path / "float.onnx")
    parity = check_parity(g, path, batches=fresh)
    assert parity["ok"], parity
    graphopt.Pipeline.parse("qdq").run(g, data=data)
    path = export(g, tmp_path / "int8.onnx")
    parity = check_parity(g, path, batches=fresh)
    # int8: torch simulates ORT's integer kernels (7-bit weights on CPUs without VNNI), so
    # they agree to float rounding of the requantisation, far below one output step
    assert parity["rel"] <= 1e-3 and not math.isnan(parity["cosine"]), parity
