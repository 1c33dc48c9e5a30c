"""The Graph contract: analyses cached by function and dropped when a pass changes the graph,
copies that share nothing, and the pipeline that made a graph recorded in its module."""

from __future__ import annotations

import torch
import torch.nn as nn

import graphopt
from graphopt.graph import PIPELINE_META, node_meta
from graphopt.optypes import call_sites, module_of


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.act(self.bn(self.conv(x))))


def _graph():
    return graphopt.trace(Net().eval(), (torch.randn(1, 3, 8, 8),))


def test_cached_analysis_runs_once_until_invalidated():
    g = _graph()
    calls = []

    def count_nodes(graph):
        calls.append(1)
        return len(graph.nodes)

    assert g.cached(count_nodes) == g.cached(count_nodes) == len(g.nodes)
    assert len(calls) == 1
    g.invalidate()
    g.cached(count_nodes)
    assert len(calls) == 2


def test_a_modifying_pass_invalidates_the_cache():
    g = _graph()
    g.cached(lambda graph: None)
    stale = g.cached(len_nodes := (lambda graph: len(graph.nodes)))
    graphopt.Pipeline.parse("fold-bn").run(g)
    assert g.cached(len_nodes) == len(g.nodes) < stale


def test_copy_shares_no_parameters_or_metadata():
    g = _graph()
    c = g.copy()
    with torch.no_grad():
        c.module.conv.weight.zero_()
    assert g.module.conv.weight.abs().sum() > 0
    n, m = g.node("conv"), c.node("conv")
    node_meta(m).module_path = "changed"
    assert node_meta(n).module_path == "conv"


def test_the_pipeline_is_recorded_and_accumulates():
    g = _graph()
    assert PIPELINE_META not in g.module.meta
    graphopt.Pipeline.parse("fold-bn").run(g)
    assert g.module.meta[PIPELINE_META] == "fold-bn"
    graphopt.Pipeline.parse("dce,remove-identity").run(g)
    assert g.module.meta[PIPELINE_META] == "fold-bn,dce,remove-identity"


def test_call_sites_and_module_of():
    g = _graph()
    sites = call_sites(g.module)
    assert sites["act"] == 2 and sites["conv"] == 1
    assert isinstance(module_of(g.module, g.node("conv")), nn.Conv2d)
    assert module_of(g.module, g.node("x")) is None


def test_a_nested_pipeline_is_not_recorded_twice():
    g = _graph()
    pipeline = graphopt.Pipeline.parse('prune(ratio=0.3,steps=2,between="dce")')
    pipeline.run(g)
    assert g.module.meta[PIPELINE_META] == str(pipeline) == "prune(ratio=0.3,steps=2,between=dce)"


def test_shape_propagation_runs_every_node_kind_as_fx_interpreter_does():
    """propagate_shapes runs the graph in its own loop; on a graph with a placeholder default,
    a get_attr, call_module / call_function / call_method nodes and a tuple output it returns
    what fx's Interpreter returns and records every node's shapes."""
    import torch.fx as fx

    root = nn.Module()
    root.lin = nn.Linear(3, 4)
    root.register_buffer("shift", torch.ones(4))
    g = fx.Graph()
    x = g.placeholder("x")
    k = g.placeholder("k", default_value=2.0)
    y = g.call_module("lin", (x,))
    s = g.get_attr("shift")
    z = g.call_function(torch.add, (y, s), {"alpha": k})
    v = g.call_method("view", (z, -1))
    g.output((v, z))
    gm = fx.GraphModule(root, g)
    inp = torch.randn(2, 3)
    graph = graphopt.Graph(gm, (inp,))
    got = graph.propagate_shapes()
    want = fx.Interpreter(gm).run(inp)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    shapes = {n.name: node_meta(n).shape for n in gm.graph.nodes}
    assert shapes["lin"] == (2, 4) and shapes["view"] == (8,) and shapes["shift"] == (4,)
    assert node_meta(next(n for n in gm.graph.nodes if n.op == "output")).container
