"""The pass manager: instruments, the pass contract, failures and reproducers, verification and
drift, summaries, ``compress`` and registering function passes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import (
    DumpDir,
    Graph,
    Pass,
    PassContractError,
    PassFailure,
    PassResult,
    Pipeline,
    PrintAfter,
    Timing,
    VerificationError,
)
from graphopt.passes.dce import DeadCodeElimination
from graphopt.passes.fold_bn import FoldBatchNorm
from graphopt.passes.remove_identity import RemoveIdentity
from graphopt.registry import Registry


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 6, bias=False)

    def forward(self, x):
        x = self.drop(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BN statistics so folding really changes the conv
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def graph() -> Graph:
    return graphopt.trace(_net(), X)


# -- test passes --------------------------------------------------------------------------------
class ScaleOutput(Pass):
    """Lossy: halve the output layer's weight."""

    name = "test-scale-output"
    exact = False

    def run(self, graph, ctx):
        with torch.no_grad():
            graph.submodule("fc").weight.mul_(0.5)
        return PassResult(True, {"summary": "halved fc.weight"})


class LyingPerturb(Pass):
    """Claims to be exact but perturbs one weight."""

    name = "test-lying-perturb"
    exact = True

    def run(self, graph, ctx):
        with torch.no_grad():
            graph.submodule("fc").weight[0, 0] += 1.0
        return PassResult(True, {})


class SilentPerturb(LyingPerturb):
    """Perturbs a weight but reports no change, so the manager does not verify it."""

    name = "test-silent-perturb"

    def run(self, graph, ctx):
        super().run(graph, ctx)
        return PassResult(False, {})


class ReturnsNone(Pass):
    name = "test-returns-none"
    exact = True

    def run(self, graph, ctx):
        return None


class Boom(Pass):
    name = "test-boom"
    exact = True

    def run(self, graph, ctx):
        raise RuntimeError("kaboom in the pass")


class BreaksGraph(Pass):
    """Leaves a node whose input shape no longer fits."""

    name = "test-breaks-graph"
    exact = True

    def run(self, graph, ctx):
        graph.module.fc = nn.Linear(5, 6)
        return PassResult(True, {})


# -- instruments --------------------------------------------------------------------------------
def test_timing_records_every_pass(graph):
    timing = Timing()
    result = Pipeline.parse("fold-bn,remove-identity,dce").run(graph, instruments=[timing])
    assert [(i, name) for i, name, _ in timing.timings] == [
        (1, "fold-bn"),
        (2, "remove-identity"),
        (3, "dce"),
    ]
    assert all(s >= 0 for _, _, s in timing.timings)
    assert [r.name for r in result.reports] == ["fold-bn", "remove-identity", "dce"]
    assert all(r.seconds >= 0 for r in result.reports)
    assert result.seconds >= max(s for _, _, s in timing.timings)


def test_print_after_only_after_the_named_pass(graph):
    texts: list[str] = []
    Pipeline.parse("remove-identity,fold-bn,dce").run(
        graph, instruments=[PrintAfter(["fold-bn"], sink=texts.append)]
    )
    assert len(texts) == 1
    text = texts[0]
    assert "02-fold-bn" in text
    # the graph text after fold-bn: the conv is there with its shape, the BN is gone
    assert "%conv = call_module[conv]" in text
    assert "4x8x8x8" in text
    assert "[bn]" not in text
    assert "[drop]" not in text  # removed by the earlier remove-identity


def test_print_after_all(graph):
    texts: list[str] = []
    Pipeline.parse("fold-bn,dce").run(graph, instruments=[PrintAfter(["all"], sink=texts.append)])
    assert len(texts) == 2
    assert "01-fold-bn" in texts[0] and "02-dce" in texts[1]


def test_dump_dir_writes_numbered_files(graph, tmp_path):
    Pipeline.parse("fold-bn,remove-identity,dce").run(graph, instruments=[DumpDir(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "00-input.txt",
        "01-fold-bn.py",
        "01-fold-bn.txt",
        "02-remove-identity.py",
        "02-remove-identity.txt",
        "03-dce.py",
        "03-dce.txt",
    ]
    assert "[bn]" in (tmp_path / "00-input.txt").read_text()
    assert "[bn]" not in (tmp_path / "01-fold-bn.txt").read_text()
    assert "[drop]" in (tmp_path / "01-fold-bn.txt").read_text()
    assert "[drop]" not in (tmp_path / "02-remove-identity.txt").read_text()
    assert "def forward" in (tmp_path / "03-dce.py").read_text()


# -- the pass contract and failures ---------------------------------------------------------------
def test_pass_returning_none_is_a_contract_error(graph):
    with pytest.raises(PassFailure) as info:
        Pipeline.of(FoldBatchNorm, ReturnsNone).run(graph)
    err = info.value
    assert isinstance(err.__cause__, PassContractError)
    msg = str(err)
    assert "'test-returns-none'" in msg
    assert "PassContractError" in msg
    assert "NoneType" in msg and "PassResult" in msg
    assert err.pass_name == "test-returns-none"
    assert err.pipeline_so_far == "fold-bn,test-returns-none"


def test_pass_that_raises_is_wrapped_with_pipeline_so_far(graph):
    with pytest.raises(PassFailure) as info:
        Pipeline.of(FoldBatchNorm, Boom, DeadCodeElimination).run(graph)
    err = info.value
    msg = str(err)
    assert "pass 'test-boom' failed" in msg
    assert "RuntimeError: kaboom in the pass" in msg
    assert "pipeline so far: fold-bn,test-boom" in msg
    assert "dce" not in msg  # the passes after the failing one are not "so far"
    assert isinstance(err.__cause__, RuntimeError)
    assert err.reproducer is None  # no dump_dir, no reproducer


def test_failure_with_dump_dir_writes_a_runnable_reproducer(graph, tmp_path):
    expected = graph.module(X)
    with pytest.raises(PassFailure) as info:
        Pipeline.of(FoldBatchNorm, RemoveIdentity, Boom).run(graph, dump_dir=tmp_path)
    err = info.value
    repro = tmp_path / "reproducer"
    assert err.reproducer == repro
    assert str(repro) in str(err)
    assert (repro / "pipeline.txt").read_text().strip() == "fold-bn,remove-identity,test-boom"
    gm = torch.load(repro / "graph.pt", weights_only=False)
    inputs = torch.load(repro / "inputs.pt", weights_only=False)
    assert isinstance(inputs, tuple) and torch.equal(inputs[0], X)
    # the graph as it was before the failing pass: BN folded, dropout removed, still correct
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "bn" not in targets and "drop" not in targets and "conv" in targets
    torch.testing.assert_close(gm(*inputs), expected, rtol=1e-4, atol=1e-5)
    assert "def forward" in (repro / "graph.py").read_text()
    # the numbered dumps of the passes that ran are there too
    assert (tmp_path / "02-remove-identity.txt").exists()


def test_broken_graph_is_a_verification_error(graph):
    with pytest.raises(VerificationError) as info:
        Pipeline.of(FoldBatchNorm, BreaksGraph).run(graph)
    assert info.value.pass_name == "test-breaks-graph"
    assert "'test-breaks-graph'" in str(info.value)
    assert "'fc'" in str(info.value)


# -- verification and drift ---------------------------------------------------------------------
def test_exact_pass_that_changes_outputs_is_caught(graph):
    with pytest.raises(VerificationError) as info:
        Pipeline.of(FoldBatchNorm, LyingPerturb).run(graph)
    err = info.value
    assert err.pass_name == "test-lying-perturb"
    assert "'test-lying-perturb'" in str(err)
    assert err.node == "fc"  # the first node whose value diverges
    assert "first diverging node 'fc'" in str(err)


def test_lossy_pass_gets_drift_metrics(graph):
    original = graph.module(X).detach()
    result = Pipeline.of(FoldBatchNorm, ScaleOutput).run(graph)
    fold, scale = result.reports
    assert fold.exact and fold.verified
    assert fold.drift["max_abs"] < 1e-4
    assert not scale.exact and scale.modified
    assert scale.verified is False  # lossy passes are measured, not verified
    d = scale.drift
    assert d["max_abs"] == pytest.approx(0.5 * original.abs().max().item(), rel=1e-3)
    assert d["max_abs"] > 0
    assert d["cosine"] == pytest.approx(1.0, abs=1e-6)  # a uniform scale keeps the direction
    assert d["top1"] == 1.0  # no bias: arg-max unchanged
    assert scale.drift_total["max_abs"] == pytest.approx(d["max_abs"], rel=1e-3)
    assert f"{d['max_abs']:.2e}" in result.summary()


def test_drift_total_is_against_the_original(graph):
    original = graph.module(X).detach()
    result = Pipeline.of(ScaleOutput, ScaleOutput).run(graph)
    first, second = result.reports
    peak = original.abs().max().item()
    assert first.drift["max_abs"] == pytest.approx(0.5 * peak, rel=1e-3)
    # second pass: 0.5*out -> 0.25*out, a step of 0.25 but 0.75 in total
    assert second.drift["max_abs"] == pytest.approx(0.25 * peak, rel=1e-3)
    assert second.drift_total["max_abs"] == pytest.approx(0.75 * peak, rel=1e-3)
    torch.testing.assert_close(result.graph.module(X), 0.25 * original)


def test_lossy_top1_drops_when_argmax_changes(graph):
    class Negate(ScaleOutput):
        name = "test-negate"

        def run(self, graph, ctx):
            with torch.no_grad():
                graph.submodule("fc").weight.neg_()
            return PassResult(True, {})

    result = Pipeline.of(Negate).run(graph)
    d = result.reports[0].drift
    assert d["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert d["top1"] == 0.0


def test_unmodified_pass_skips_verification(graph):
    result = Pipeline.of(SilentPerturb, DeadCodeElimination).run(graph)
    silent, dce = result.reports
    # not checked: the perturbation slips through because the pass said nothing changed
    assert silent.modified is False and silent.verified is False
    assert silent.drift == {} and silent.drift_total == {}
    assert dce.modified is False and dce.verified is False


def test_modified_exact_pass_is_verified(graph):
    result = Pipeline.parse("fold-bn").run(graph)
    assert result.reports[0].modified and result.reports[0].verified


def test_verify_false_skips_numeric_checks(graph):
    result = Pipeline.of(LyingPerturb).run(graph, verify=False)
    assert result.reports[0].modified and not result.reports[0].verified


# -- results, compress, round trips, registration ----------------------------------------------
def test_summary_names_every_pass(graph):
    result = Pipeline.parse("fold-bn(backward=false),remove-identity,dce").run(graph)
    summary = result.summary()
    for name in ("fold-bn(backward=false)", "remove-identity", "dce"):
        assert name in summary
    assert "folded 1 of 1 BatchNorms" in summary
    assert result.pipeline == "fold-bn(backward=false),remove-identity,dce"
    d = result.to_dict()
    assert [p["name"] for p in d["passes"]] == ["fold-bn", "remove-identity", "dce"]


def test_compress_one_call():
    model = _net()
    expected = model(X)
    result = graphopt.compress(model, "fold-bn,dce", example_inputs=X)
    assert isinstance(result, graphopt.PipelineResult)
    assert isinstance(result.graph, Graph)
    module = result.graph.module
    assert isinstance(module, torch.nn.Module)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    torch.testing.assert_close(module(X), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(module(X[:1]), model(X[:1]), rtol=1e-4, atol=1e-5)
    assert [r.name for r in result.reports] == ["fold-bn", "dce"]


def test_compress_takes_a_graph_and_leaves_it_alone(graph):
    result = graphopt.compress(graph, Pipeline.parse("fold-bn"))
    assert result.graph is not graph
    assert any(n.target == "bn" for n in graph.nodes)
    assert not any(n.target == "bn" for n in result.graph.nodes)


def test_compress_takes_example_inputs_from_data():
    data = [(X, torch.tensor([0, 1, 2, 3]))]
    result = graphopt.compress(_net(), "fold-bn", data=data)
    assert result.graph.example_inputs[0].shape == (1, 3, 8, 8)


def test_run_rejects_a_module():
    with pytest.raises(TypeError, match="graphopt.trace"):
        Pipeline.parse("dce").run(_net())


def test_pipeline_of_round_trips_through_str():
    p = Pipeline.of(
        FoldBatchNorm(FoldBatchNorm.Options(backward=False)), RemoveIdentity, DeadCodeElimination()
    )
    text = str(p)
    assert text == "fold-bn(backward=false),remove-identity,dce"
    again = Pipeline.parse(text)
    assert again == p
    assert str(again) == text
    assert [s.options for s in again.specs] == [s.options for s in p.specs]
    # defaults are not printed
    assert str(Pipeline.of(FoldBatchNorm(FoldBatchNorm.Options(backward=True)))) == "fold-bn"


@dataclass(frozen=True)
class _ScaleOptions:
    factor: float = 1.0


def test_function_pass_registered_in_a_fresh_registry(graph):
    reg = Registry()
    calls = []

    @graphopt.register_pass(name="x", exact=True, registry=reg)
    def relu_to_relu(g, ctx, options):
        """Replace nothing; count call_module nodes."""
        calls.append(sum(1 for n in g.nodes if n.op == "call_module"))
        return PassResult(False, {"summary": "looked"})

    assert reg.origin("x") == "user"
    assert "x" in reg.names() and "fold-bn" in reg.names()
    assert relu_to_relu.name == "x" and relu_to_relu.exact
    assert "x" not in graphopt.REGISTRY.names()  # the global registry is untouched

    @graphopt.register_pass(name="scale-fc", options=_ScaleOptions, registry=reg)
    def scale_fc(g, ctx, options):
        with torch.no_grad():
            g.submodule("fc").weight.mul_(options.factor)
        return PassResult(options.factor != 1.0, {"summary": f"x{options.factor}"})

    assert scale_fc.exact is False
    pipe = Pipeline.parse("fold-bn,x,scale-fc(factor=2.0)", registry=reg)
    assert str(pipe) == "fold-bn,x,scale-fc(factor=2.0)"
    with pytest.raises(graphopt.UnknownPassError):
        Pipeline.parse("x")  # not in the global registry
    before = graph.module(X).detach()
    result = pipe.run(graph)
    assert calls == [5]  # conv, relu, drop, pool, fc: it ran once, after bn was folded
    assert [r.name for r in result.reports] == ["fold-bn", "x", "scale-fc"]
    assert result.reports[1].summary == "looked"
    torch.testing.assert_close(result.graph.module(X), 2 * before, rtol=1e-4, atol=1e-5)


def test_function_pass_in_the_global_registry_is_cleaned_up(graph):
    name = "test-global-fn-pass"
    try:

        @graphopt.register_pass(name=name, exact=True)
        def noop(g, ctx, options):
            return PassResult(False, {})

        assert graphopt.REGISTRY.origin(name) == "user"
        result = Pipeline.parse(f"dce,{name}").run(graph)
        assert result.reports[1].name == name
    finally:
        graphopt.REGISTRY._passes.pop(name, None)
        graphopt.REGISTRY._origin.pop(name, None)
    assert name not in graphopt.REGISTRY.names()


def test_nested_pipeline_names_are_checked_when_parsed():
    with pytest.raises(graphopt.OptionError, match=r"between=.*unknown pass 'distil'.*'distill'"):
        graphopt.Pipeline.parse('prune(ratio=0.5,steps=2,between="distil(epochs=1)")')
    p = graphopt.Pipeline.parse('prune(ratio=0.5,steps=2,between="distill(epochs=1)")')
    assert p.uses_data() and p.uses_teacher()  # through the nested distill
    assert not graphopt.Pipeline.parse("prune(ratio=0.5)").uses_data()


def test_run_nested_needs_the_manager():
    from graphopt.pass_api import PassContext

    with pytest.raises(RuntimeError, match="only the pass manager"):
        PassContext().run_nested("dce", None)


def test_a_model_that_computes_nan_is_blamed_before_any_pass():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)
    ).eval()
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    g = graphopt.trace(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(graphopt.DataError) as info:
        graphopt.Pipeline.parse("fold-bn").run(g)
    msg = str(info.value)
    assert "before any pass ran" in msg and "'3'" in msg and "weight" in msg
    assert "fold-bn" not in msg  # not blamed on the pass


def test_data_as_a_generator_is_read_once_and_empty_data_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    g = graphopt.trace(model, torch.randn(1, 3, 8, 8))
    gen = (torch.randn(4, 3, 8, 8) for _ in range(3))
    result = graphopt.Pipeline.parse("qdq(batches=3)").run(g, data=gen)
    assert result.reports[0].details["calibration"]["batches"] == 3
    for bad, match in (([], "no batches"), ([torch.randn(0, 3, 8, 8)], "batch 0 holds no samples")):
        g = graphopt.trace(model, torch.randn(1, 3, 8, 8))
        with pytest.raises(graphopt.DataError, match=match):
            graphopt.Pipeline.parse("prune(ratio=0.5,importance=taylor)").run(g, data=bad)


def test_print_after_writes_without_logging_configured(capsys):
    graph = graphopt.trace(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), torch.randn(1, 3, 8, 8)
    )
    Pipeline.parse("fold-bn").run(graph, instruments=[PrintAfter(["fold-bn"])])
    err = capsys.readouterr().err
    assert "// graph after 01-fold-bn" in err and "call_module[0]" in err


def test_a_pipeline_that_cannot_do_anything_warns(caplog):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    with caplog.at_level(logging.WARNING, logger="graphopt.manager"):
        Pipeline.parse("").run(graphopt.trace(net, x))
    assert "the pipeline is empty" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="graphopt.manager"):
        Pipeline.parse("sparsify(schedule=polynomial)").run(graphopt.trace(net, x))
    assert "no pass after it trains" in caplog.text
    caplog.clear()
    data = [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))]
    with caplog.at_level(logging.WARNING, logger="graphopt.manager"):
        Pipeline.parse("sparsify(schedule=polynomial),distill(epochs=1)").run(
            graphopt.trace(net, x), data=data
        )
    assert "no pass after it trains" not in caplog.text


# -- reusing the trace's forward as the reference -------------------------------------------------
def _count_forwards(graph: Graph) -> list[int]:
    calls = [0]
    graph.module.fc.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_reference_is_the_traces_own_forward(graph):
    # the hook makes the module's code unchanged but counts every run of fc
    calls = _count_forwards(graph)
    result = Pipeline.of(ScaleOutput).run(graph)
    # one run: the propagation after the pass; the reference came from the trace
    assert calls[0] == 1
    assert result.reports[0].drift["max_abs"] > 0


@pytest.mark.parametrize(
    "edit",
    [
        "inplace",  # bumps the version counter
        "data",  # writes through .data: no version bump, the sum changes
        "replace",  # a new parameter object
        "train",  # a training flag
        "setting",  # a module's plain attribute
    ],
)
def test_an_edit_after_trace_gets_a_fresh_reference(graph, edit):
    fc = graph.module.fc
    with torch.no_grad():
        if edit == "inplace":
            fc.weight.mul_(2.0)
        elif edit == "data":
            fc.weight.data.mul_(2.0)
        elif edit == "replace":
            fc.weight = nn.Parameter(fc.weight.detach() * 2.0)
        elif edit == "setting":
            graph.module.conv.padding = (2, 2)  # the output grows by 2 pixels a side
        else:
            graph.module.drop.train()
    assert graph.example_outputs() is None
    graph.module.drop.eval()
    expected = graph.module(X).detach()
    # an exact pass checked against a stale reference would be reported as diverging
    result = Pipeline.of(FoldBatchNorm).run(graph)
    assert result.reports[0].verified
    torch.testing.assert_close(result.graph.module(X), expected)


def test_example_outputs_match_a_plain_forward(graph):
    torch.testing.assert_close(graph.example_outputs(), graph.module(X), rtol=0, atol=0)


# -- recompiling only when the code changed ------------------------------------------------------
class SwapReluForNeg(Pass):
    """Rewrites the graph (relu -> neg) and does not recompile: the manager must."""

    name = "test-swap-relu"
    exact = False

    def run(self, graph, ctx):
        for n in graph.module.graph.nodes:
            if n.op == "call_module" and n.target == "relu":
                n.op, n.target = "call_function", torch.neg
        return PassResult(True, {})


class SwapSilently(SwapReluForNeg):
    name = "test-swap-silently"

    def run(self, graph, ctx):
        super().run(graph, ctx)
        return PassResult(False, {})


def _counting_recompiles(graph, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = type(graph.module).recompile

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(type(graph.module), "recompile", counted)
    return calls


def test_parameter_only_pass_is_not_recompiled(graph, monkeypatch):
    calls = _counting_recompiles(graph, monkeypatch)
    code = graph.module.code
    result = Pipeline.of(ScaleOutput).run(graph)
    assert calls == [] and graph.module.code == code
    assert result.reports[0].drift["max_abs"] > 0  # the check forward still ran


def test_graph_change_without_recompile_is_recompiled(graph, monkeypatch):
    calls = _counting_recompiles(graph, monkeypatch)
    Pipeline.of(SwapReluForNeg).run(graph)
    assert len(calls) == 1 and "torch.neg" in graph.module.code
    x = graph.module.conv(X)  # the module computes the rewritten graph
    want = graph.module.fc(torch.flatten(graph.module.pool(-graph.module.bn(x)), 1))
    torch.testing.assert_close(graph.module(X), want)


def test_graph_change_reported_as_none_is_recompiled_with_a_warning(graph, caplog):
    with caplog.at_level(logging.WARNING, logger="graphopt.manager"):
        Pipeline.of(SwapSilently).run(graph)
    assert "torch.neg" in graph.module.code
    assert "test-swap-silently" in caplog.text and "reported no change" in caplog.text
    assert graph.compiled_state is None  # no node list is kept between runs


def test_pass_that_recompiled_itself_is_not_recompiled_again(monkeypatch):
    """Head pruning rewrites reshape sizes and recompiles in the surgery: once, not twice."""
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    g = graphopt.trace(
        nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval(), torch.randn(2, 5, 16)
    )
    calls = _counting_recompiles(g, monkeypatch)
    Pipeline.parse("prune(ratio=0.5)").run(g)
    assert len(calls) == 1
