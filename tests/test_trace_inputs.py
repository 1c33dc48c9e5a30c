"""trace() takes the inputs real models want: keyword dicts, ``(args, kwargs)``, flags left at
their defaults, optional tensors; and refuses bad ones by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.backends.onnxruntime import check_parity, export


class Flags(nn.Module):
    """``embed`` and ``scale`` change the computation by Python control flow."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask=None, embed=False, scale=None, *, temperature: float = 1.0):
        h = torch.relu(self.body(x))
        if mask is not None:
            h = h * mask
        if embed:
            return h
        if scale is not None:
            h = h * scale
        return {"logits": self.head(h) / temperature, "hidden": h}


def _check(g, model, *args, **kwargs):
    got = g.module(*g.example_inputs)
    want = model(*args, **kwargs)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k])
    else:
        torch.testing.assert_close(got, want)


def test_defaults_are_bound_and_reported():
    model = Flags().eval()
    x = torch.randn(2, 6)
    g = graphopt.trace(model, x)
    rep = g.trace_report
    assert rep["inputs"] == ["x"]
    assert rep["bound"] == {"mask": "None", "embed": "False", "scale": "None", "temperature": "1.0"}
    assert [n.op for n in g.nodes].count("placeholder") == 1
    assert not any("_assert" in str(n.target) for n in g.nodes)  # guards removed
    _check(g, model, x)


def test_a_dict_of_keyword_inputs_and_a_flag_given_as_a_constant():
    model = Flags().eval()
    x, mask = torch.randn(2, 6), (torch.rand(2, 8) > 0.5).float()
    g = graphopt.trace(model, {"mask": mask, "x": x, "embed": True})
    assert g.trace_report["inputs"] == ["x", "mask"]  # forward's order, not the dict's
    assert g.trace_report["bound"]["embed"] == "True"
    assert g.example_inputs[0] is not None and torch.equal(g.example_inputs[1], mask)
    _check(g, model, x, mask=mask, embed=True)


def test_args_kwargs_pair():
    model = Flags().eval()
    x, scale = torch.randn(2, 6), torch.tensor(0.5)
    g = graphopt.trace(model, ((x,), {"scale": scale}))
    assert g.trace_report["inputs"] == ["x", "scale"]
    _check(g, model, x, scale=scale)


def test_passes_and_onnx_run_on_a_graph_with_bound_inputs(tmp_path):
    model = Flags().eval()
    x = torch.randn(4, 6)
    g = graphopt.trace(model, {"x": x, "embed": False})
    result = graphopt.Pipeline.parse("fold-bn,dce,prune(ratio=0.5)").run(g)
    path = export(result.graph, tmp_path / "flags.onnx")
    parity = check_parity(result.graph, path)
    assert parity["max_abs"] <= 1e-5, parity


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"x": torch.randn(1, 6), "maks": torch.ones(1, 8)}, "'maks' is not a parameter.*mask"),
        ({"mask": torch.ones(1, 8)}, "needs 'x'"),
        ((torch.randn(1, 6),) * 5, "positional inputs"),
        ({"x": torch.randn(1, 6), "embed": [1]}, "'embed' is a list"),
        ({"embed": True, "x": None}, "no tensor"),
    ],
)
def test_bad_inputs_are_named(inputs, match):
    with pytest.raises(graphopt.DataError, match=match):
        graphopt.trace(Flags().eval(), inputs)


def test_onnx_names_inputs_and_outputs_after_the_model(tmp_path):
    import onnx

    model = Flags().eval()
    g = graphopt.trace(model, {"x": torch.randn(2, 6), "mask": torch.ones(2, 8)})
    proto = onnx.load(str(export(g, tmp_path / "named.onnx")))
    assert [i.name for i in proto.graph.input] == ["x", "mask"]
    assert [o.name for o in proto.graph.output] == ["logits", "hidden"]
    positional = graphopt.trace(nn.Sequential(nn.Linear(6, 2)).eval(), torch.randn(1, 6))
    proto = onnx.load(str(export(positional, tmp_path / "plain.onnx")))
    assert [i.name for i in proto.graph.input] == ["input"]  # positional: the usual name
