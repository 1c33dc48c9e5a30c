"""``graphopt.trace``: node metadata, leaf modules and the errors a user sees when a model does
not trace or the example inputs do not fit. (Every torchvision classification model tracing is
covered by the zoo test.)"""

from __future__ import annotations

import inspect
import operator

import pytest
import torch
import torch.nn as nn
import torchvision

import graphopt
from graphopt import Graph, node_meta


class Inner(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # the line the TraceError must point at
            return x * 2
        return x - 1


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.inner(x))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class TopLevelBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.max() > 0:  # data-dependent, in the top-level forward
            return y
        return -y


def _line_of(cls: type, needle: str) -> int:
    lines, start = inspect.getsourcelines(cls.forward)
    for i, text in enumerate(lines):
        if needle in text:
            return start + i
    raise AssertionError(f"{needle!r} not in {cls.__name__}.forward")


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


@pytest.fixture(scope="module")
def resnet_graph() -> Graph:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return graphopt.trace(model, torch.randn(1, 3, 64, 64))


# -- metadata -----------------------------------------------------------------------------------
def test_trace_returns_graph_with_shapes_and_dtypes():
    model = _small_cnn()
    x = torch.randn(2, 3, 16, 16)
    g = graphopt.trace(model, x)
    assert isinstance(g, Graph)
    assert isinstance(g.module, torch.fx.GraphModule)
    assert g.example_inputs[0].shape == x.shape
    conv = g.node("_0")
    assert conv.op == "call_module"
    meta = node_meta(conv)
    assert meta.shape == (2, 8, 8, 8)
    assert meta.dtype == "float32"
    assert meta.module_type == "Conv2d"
    assert node_meta(g.node("_3")).shape == (2, 8, 1, 1)
    out = next(n for n in g.nodes if n.op == "output")
    assert node_meta(out).shape == (2, 5)
    # every tensor-producing node got a shape
    for n in g.nodes:
        if n.op in ("placeholder", "call_module", "call_function", "call_method"):
            assert node_meta(n).outputs, f"node {n.name} has no shape"
    # the traced module computes what the model computes
    torch.testing.assert_close(g.module(x), model(x), rtol=0, atol=0)


def test_dtype_follows_the_inputs():
    model = _small_cnn().double()
    g = graphopt.trace(model, torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert node_meta(g.node("_0")).dtype == "float64"


def test_module_paths_and_provenance(resnet_graph):
    g = resnet_graph
    conv = g.node("layer1_0_conv1")
    meta = node_meta(conv)
    assert conv.op == "call_module"
    assert meta.module_path == "layer1.0.conv1"
    assert meta.provenance == ["layer1.0.conv1"]
    assert meta.shape == (1, 64, 16, 16)
    assert node_meta(g.node("layer2_0_conv1")).shape == (1, 128, 8, 8)
    assert node_meta(g.node("fc")).shape == (1, 10)
    # the residual add is a call_function made by BasicBlock layer1.0's forward
    adds = [n for n in g.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert len(adds) == 8  # two BasicBlocks in each of four stages
    first = node_meta(adds[0])
    assert first.module_path == "layer1.0"
    assert first.module_type == "BasicBlock"
    assert node_meta(adds[-1]).module_path == "layer4.1"
    # the flatten in ResNet.forward belongs to the top-level module
    flat = next(n for n in g.nodes if n.target is torch.flatten)
    assert node_meta(flat).module_path in ("", None)
    # every call_module node's path is its target and names a real submodule
    for n in g.nodes:
        if n.op == "call_module":
            assert node_meta(n).module_path == n.target
            g.submodule(n.target)
            assert node_meta(n).leaf is False


# -- leaf modules -------------------------------------------------------------------------------
def _assert_opaque(g: Graph, path: str, cls: type) -> None:
    leaf = [n for n in g.nodes if n.op == "call_module" and n.target == path]
    assert len(leaf) == 1
    meta = node_meta(leaf[0])
    assert meta.leaf is True
    assert meta.module_type == cls.__name__
    assert isinstance(g.submodule(path), cls)
    for n in g.nodes:
        assert not str(n.target).startswith(path + "."), f"{n.name} traced into leaf {path}"
        assert not (node_meta(n).module_path or "").startswith(path + "."), n.name


def test_leaf_by_path_glob(resnet_graph):
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    g = graphopt.trace(model, x, leaf_modules=["layer2.*"])
    for path in ("layer2.0", "layer2.1"):
        _assert_opaque(g, path, torchvision.models.resnet.BasicBlock)
    # layer1 blocks are still traced through, and only the named modules are leaves
    assert any(n.target == "layer1.0.conv1" for n in g.nodes)
    leaves = [n.target for n in g.nodes if node_meta(n).leaf]
    assert leaves == ["layer2.0", "layer2.1"]
    torch.testing.assert_close(g.module(x), model(x))
    # the unleafed trace has no leaf flag anywhere
    assert not any(node_meta(n).leaf for n in resnet_graph.nodes)


def test_leaf_by_class():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    g = graphopt.trace(model, x, leaf_modules=[torchvision.models.resnet.BasicBlock])
    blocks = [n for n in g.nodes if n.op == "call_module" and node_meta(n).leaf]
    assert [n.target for n in blocks] == [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)]
    for n in blocks:
        _assert_opaque(g, n.target, torchvision.models.resnet.BasicBlock)
    torch.testing.assert_close(g.module(x), model(x))


# -- trace errors -------------------------------------------------------------------------------
def test_control_flow_in_submodule_names_path_source_line_and_leaf_hint():
    with pytest.raises(graphopt.TraceError) as info:
        graphopt.trace(Branchy(), torch.randn(1, 3, 8, 8), strict=True)
    err = info.value
    msg = str(err)
    line = _line_of(Inner, "if x.sum() > 0")
    assert "'block.inner'" in msg
    assert f"{__file__}:{line}" in msg
    assert "if x.sum() > 0" in msg
    assert "leaf_modules" in msg and "block.inner" in msg.split("leaf_modules", 1)[1]
    assert "\n" not in msg  # one clear line
    assert err.module_path == "block.inner"
    assert err.source is not None and err.source.startswith(f"{__file__}:{line}")
    assert isinstance(err, graphopt.GraphoptError)


def test_an_untraceable_submodule_becomes_a_leaf_automatically():
    model = Branchy()
    x = torch.randn(1, 3, 8, 8)
    g = graphopt.trace(model, x)
    _assert_opaque(g, "block.inner", Inner)
    (leaf,) = g.trace_report["auto_leaves"]
    assert leaf["module"] == "block.inner"
    assert "control flow" in leaf["reason"]
    assert leaf["source"].startswith(f"{__file__}:{_line_of(Inner, 'if x.sum() > 0')}")
    for sign in (1, -1):  # both branches still run: the leaf is the user's own code
        torch.testing.assert_close(g.module(sign * x), model(sign * x))


def test_marking_the_failing_submodule_as_leaf_traces():
    model = Branchy()
    x = torch.randn(1, 3, 8, 8)
    g = graphopt.trace(model, x, leaf_modules=["block.inner"])
    _assert_opaque(g, "block.inner", Inner)
    assert [n.target for n in g.nodes if node_meta(n).leaf] == ["block.inner"]
    assert node_meta(g.node("block_inner")).shape == (1, 4, 8, 8)
    torch.testing.assert_close(g.module(x), model(x))
    # and as a class too
    g2 = graphopt.trace(model, x, leaf_modules=[Inner])
    _assert_opaque(g2, "block.inner", Inner)


def test_control_flow_at_top_level_gets_a_clear_error():
    with pytest.raises(graphopt.TraceError) as info:
        graphopt.trace(TopLevelBranch(), torch.randn(2, 4))
    msg = str(info.value)
    line = _line_of(TopLevelBranch, "if y.max() > 0")
    assert "TopLevelBranch" in msg
    assert f"{__file__}:{line}" in msg
    assert "leaf_modules" in msg
    assert info.value.module_path is None


def test_wrong_channel_count_raises_data_error_naming_the_node():
    model = _small_cnn()
    with pytest.raises(graphopt.DataError) as info:
        graphopt.trace(model, torch.randn(1, 4, 16, 16))
    msg = str(info.value)
    assert "'_0'" in msg  # the conv node that failed
    assert "(1, 4, 16, 16)" in msg  # the input shape given
    assert "channels" in msg
    assert "\n" not in msg
    assert not isinstance(info.value, graphopt.TraceError)


def test_data_error_names_a_nested_module_path():
    model = torchvision.models.resnet18(num_classes=10).eval()
    # right channel count, but a width that breaks the residual add after downsampling
    model.layer2[0].downsample = nn.Identity()
    with pytest.raises(graphopt.DataError) as info:
        graphopt.trace(model, torch.randn(1, 3, 32, 32))
    msg = str(info.value)
    assert "'layer2.0'" in msg
    assert "add" in msg


@pytest.mark.parametrize(
    "not_a_module",
    [lambda x: x * 2, torch.randn(3), "resnet18", None],
    ids=["function", "tensor", "string", "none"],
)
def test_non_module_is_a_trace_error(not_a_module):
    with pytest.raises(graphopt.TraceError, match="expects a torch.nn.Module"):
        graphopt.trace(not_a_module, torch.randn(1, 3))


def test_bad_example_inputs_type_is_a_data_error():
    with pytest.raises(graphopt.DataError, match="example_inputs"):
        graphopt.trace(_small_cnn(), [[1.0, 2.0]])


def test_multiple_inputs_and_tuple_outputs():
    class TwoInTwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(5, 4)

        def forward(self, x, y):
            s = self.a(x) + self.b(y)
            return s, s.sum(dim=1)

    g = graphopt.trace(TwoInTwoOut(), (torch.randn(2, 3), torch.randn(2, 5)))
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    assert [node_meta(p).shape for p in placeholders] == [(2, 3), (2, 5)]
    out = next(n for n in g.nodes if n.op == "output")
    assert [t.shape for t in node_meta(out).outputs] == [(2, 4), (2,)]
    assert node_meta(out).shape is None  # several outputs: no single shape


class _FunctionsAndMethods(nn.Module):
    """Plain torch functions and Tensor methods reaching the proxy's ``__torch_function__``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.arange(4.0))

    def forward(self, x):
        y = torch.flatten(x, 1)  # a function
        y = torch.cat([y, y], dim=1)  # a function over a list of proxies
        z = torch.ones(4).add(y[:, :4])  # a real tensor's method with a proxy argument
        return torch.nn.functional.relu(z) + self.offset


def test_torch_functions_and_tensor_methods_are_recorded_as_fx_records_them(monkeypatch):
    """graphopt's proxy skips torch.overrides' table for plain functions; the recorded ops must
    still be fx's (call_function for functions, call_method for Tensor methods), and the code
    the same as with fx's own proxy, here and on a torchvision model."""
    import torch.fx as fx

    from graphopt.tracing import _Tracer

    x = torch.randn(2, 3, 2)
    g = graphopt.trace(_FunctionsAndMethods(), x, frontend="fx")
    ops = {(n.op, getattr(n.target, "__name__", n.target)) for n in g.nodes}
    assert {("call_function", "flatten"), ("call_function", "cat")} <= ops
    assert {("call_method", "add"), ("call_function", "relu")} <= ops
    torch.testing.assert_close(g.module(x), _FunctionsAndMethods()(x))
    tv = torchvision.models.mobilenet_v3_small(weights=None).eval()
    xs = torch.randn(1, 3, 64, 64)
    cases = ((tv, xs), (_FunctionsAndMethods(), x))
    ours = [graphopt.trace(m, i, frontend="fx").module.code for m, i in cases]
    monkeypatch.setattr(_Tracer, "proxy", lambda self, node: fx.Proxy(node, self))
    assert ours == [graphopt.trace(m, i, frontend="fx").module.code for m, i in cases]


def test_the_proxy_fast_path_never_takes_a_tensor_method_for_a_function():
    """Ground truth: torch.overrides.is_tensor_method_or_property, over every public function
    of torch, torch.nn.functional, torch.linalg and torch.special and every attribute of
    torch.Tensor (property getters included)."""
    from graphopt.tracing import _plain_function

    candidates = []
    for ns in (torch, torch.nn.functional, torch.linalg, torch.special):
        candidates += [getattr(ns, n) for n in dir(ns) if not n.startswith("_")]
    for n in dir(torch.Tensor):
        attr = inspect.getattr_static(torch.Tensor, n, None)
        candidates.append(getattr(torch.Tensor, n, None))
        if hasattr(attr, "__get__") and not callable(attr):
            candidates.append(attr.__get__)
    checked = 0
    for f in candidates:
        if callable(f) and _plain_function(f):
            assert not torch.overrides.is_tensor_method_or_property(f), f
            checked += 1
    assert checked > 500  # the fast path covers the torch namespace's functions
