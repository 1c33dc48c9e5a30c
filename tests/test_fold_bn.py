"""``fold-bn``: every foldable pattern folds exactly and removes the BN; every pattern where
folding is not exact (or not safe) keeps the BN and says why; the verifier catches a pass that
claims to be exact but is not."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.errors import VerificationError
from graphopt.pass_api import Pass, PassResult

_BN = nn.modules.batchnorm._BatchNorm
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (11,), 2: (9, 8), 3: (6, 5, 7)}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding them is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BN) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))
    return model


def bn_nodes(graph: graphopt.Graph) -> list[str]:
    gm = graph.module
    return [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _BN)
    ]


def bn_modules(graph: graphopt.Graph) -> list[str]:
    return [name for name, m in graph.module.named_modules() if isinstance(m, _BN)]


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = float(ref.abs().max())
    assert scale > 0
    err = float((out - ref).abs().max())
    assert err <= rtol * scale, f"max|Δ| = {err:.3e} > {rtol:g} * {scale:.3e}"


def fold(model: nn.Module, x: torch.Tensor, pipeline: str = "fold-bn"):
    """Trace ``model`` (eval), run ``pipeline``; return (result, report details, outputs)."""
    with torch.no_grad():
        ref = model(x)
    graph = graphopt.trace(model, x)
    result = graphopt.Pipeline.parse(pipeline).run(graph)
    with torch.no_grad():
        out = result.graph.module(x)
    return result, result.reports[0].details, out, ref


def assert_all_folded(model: nn.Module, x: torch.Tensor, n_bn: int = 1) -> dict:
    model = randomize_bn(model).eval()
    result, details, out, ref = fold(model, x)
    assert_close_rel(out, ref)
    assert len(details["folded"]) == n_bn, details
    assert details["not_folded"] == []
    assert bn_nodes(result.graph) == []
    assert bn_modules(result.graph) == []
    assert result.reports[0].modified and result.reports[0].verified
    return details


def assert_not_folded(model: nn.Module, x: torch.Tensor, bn: str, *words: str) -> dict:
    """The BN ``bn`` stays (node and module), and its reason contains every one of ``words``."""
    model = randomize_bn(model).eval()
    result, details, out, ref = fold(model, x)
    assert_close_rel(out, ref)
    assert bn in bn_nodes(result.graph)
    assert bn in bn_modules(result.graph)
    assert bn not in {f["bn"] for f in details["folded"]}
    reasons = [e["reason"] for e in details["not_folded"] if e["bn"] == bn]
    assert len(reasons) == 1, details
    for w in words:
        assert w.lower() in reasons[0].lower(), f"{w!r} not in reason {reasons[0]!r}"
    return details


# -- forward: layer -> BN ----------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_bn_folds(dim, groups, bias, affine):
    model = nn.Sequential(
        CONV[dim](4, 6, 3, stride=2, padding=1, groups=groups, bias=bias),
        BN[dim](6, affine=affine),
        nn.ReLU(),
    )
    d = assert_all_folded(model, torch.randn(2, 4, *SPATIAL[dim]))
    assert d["folded"] == [{"bn": "1", "into": "0", "direction": "forward"}]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_transpose_bn_folds(dim, groups, bias, affine):
    # out channels per group (3) differ from in channels per group (2): a wrong weight axis
    # or group layout would either fail to reshape or change the outputs
    model = nn.Sequential(
        CONVT[dim](4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=bias),
        BN[dim](6, affine=affine),
    )
    d = assert_all_folded(model, torch.randn(2, 4, *SPATIAL[dim]))
    assert d["folded"][0]["direction"] == "forward"


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn1d_folds(bias):
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.BatchNorm1d(7), nn.Tanh())
    assert_all_folded(model, torch.randn(4, 5))


def test_two_bns_in_a_row_both_fold():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    assert_all_folded(model, torch.randn(1, 3, 8, 8), n_bn=2)


# -- backward: BN -> layer ---------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_conv_unpadded_folds(dim, groups, bias):
    model = nn.Sequential(BN[dim](4), CONV[dim](4, 6, 3, stride=2, groups=groups, bias=bias))
    d = assert_all_folded(model, torch.randn(2, 4, *SPATIAL[dim]))
    assert d["folded"] == [{"bn": "0", "into": "1", "direction": "backward"}]


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("dim", [1, 2])
def test_bn_conv_non_zero_padding_mode_folds(mode, dim):
    model = nn.Sequential(BN[dim](4), CONV[dim](4, 5, 3, padding=1, padding_mode=mode))
    d = assert_all_folded(model, torch.randn(2, 4, *SPATIAL[dim]))
    assert d["folded"][0]["direction"] == "backward"


@pytest.mark.parametrize(("padding", "kernel"), [("valid", 3), ("same", 1), (0, 1)])
def test_bn_conv_string_padding_without_zeros_folds(padding, kernel):
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 5, kernel, padding=padding))
    assert_all_folded(model, torch.randn(1, 4, 7, 7))


def test_bn1d_linear_folds():
    model = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3))
    d = assert_all_folded(model, torch.randn(5, 6))
    assert d["folded"][0]["direction"] == "backward"


def test_bn_after_shared_input_folds_backward():
    """The BN's input has other users (a residual), but the BN's only user is a 1x1 conv."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.stem(x)
            return y + self.conv(self.bn(y))

    d = assert_all_folded(M(), torch.randn(1, 3, 8, 8))
    assert d["folded"] == [{"bn": "bn", "into": "conv", "direction": "backward"}]


# -- where fold-bn must not fold -----------------------------------------------------------------
def test_conv_output_with_another_user_is_not_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.relu(self.bn(y)) + y

    d = assert_not_folded(M(), torch.randn(1, 3, 8, 8), "bn", "'conv'", "also used by", "add")
    (entry,) = d["not_folded"]
    assert "backward: it feeds 'relu' (ReLU)" in entry["reason"]


def test_training_mode_bn_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].train()
    model = randomize_bn(model)
    graph = graphopt.trace(model, torch.randn(2, 3, 8, 8))
    result = graphopt.Pipeline.parse("fold-bn").run(graph)
    details = result.reports[0].details
    assert bn_nodes(result.graph) == ["1"]
    assert details["folded"] == []
    (entry,) = details["not_folded"]
    assert entry["bn"] == "1"
    assert "training mode" in entry["reason"] and "batch statistics" in entry["reason"]
    assert not result.reports[0].modified


def test_bn_over_another_dim_is_not_folded():
    """Linear on [N, L, C] then BatchNorm1d(L) normalises dim 1 (L), not the linear's output
    features (C); with L == C the channel counts coincide but folding would be wrong."""
    L = C = 6
    model = nn.Sequential(nn.Linear(C, C), nn.BatchNorm1d(L))
    assert_not_folded(model, torch.randn(3, L, C), "1", "3-D", "feature dimension")


def test_bn_over_another_dim_does_not_fold_backward_into_linear():
    """BatchNorm1d(C) on [N, C, L] followed by Linear(L, ...) with L == C."""
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 4))
    assert_not_folded(model, torch.randn(3, 5, 5), "0", "3-D", "channel dimension")


def test_bn_into_zero_padded_conv_is_not_folded():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1))
    assert_not_folded(model, torch.randn(1, 4, 8, 8), "0", "zero-pads", "padding=(1, 1)")


def test_bn_into_same_padded_conv_is_not_folded():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding="same"))
    assert_not_folded(model, torch.randn(1, 4, 8, 8), "0", "zero-pads", "same")


def test_bn_into_conv_transpose_is_not_folded():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 5, 3))
    assert_not_folded(model, torch.randn(1, 4, 6, 6), "0", "transposed")


def test_bn_without_running_stats_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert_not_folded(model, torch.randn(2, 3, 8, 8), "1", "track_running_stats=False")


def test_shared_bn_is_not_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) * self.bn(self.b(x))

    model = randomize_bn(M()).eval()
    x = torch.randn(1, 3, 8, 8)
    result, details, out, ref = fold(model, x)
    assert_close_rel(out, ref)
    assert bn_nodes(result.graph) == ["bn", "bn"]
    assert details["folded"] == []
    assert len(details["not_folded"]) == 2
    for entry in details["not_folded"]:
        assert entry["bn"] == "bn"
        assert "shared" in entry["reason"] and "2 places" in entry["reason"]


def test_shared_conv_is_not_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    assert_not_folded(M(), torch.randn(1, 3, 6, 6), "bn", "'conv'", "2 places")


def test_tied_linear_weight_is_not_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + self.b(x)

    assert_not_folded(M(), torch.randn(3, 4), "bn", "tied", "b.weight")


def test_leaf_bn_is_not_folded():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    graph = graphopt.trace(model, torch.randn(1, 3, 6, 6), leaf_modules=["1"])
    details = graphopt.Pipeline.parse("fold-bn").run(graph).reports[0].details
    assert bn_nodes(graph) == ["1"]
    assert "leaf" in details["not_folded"][0]["reason"]


def test_backward_option_off_keeps_bn_before_conv():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1))).eval()
    graph = graphopt.trace(model, torch.randn(1, 4, 6, 6))
    details = graphopt.Pipeline.parse("fold-bn(backward=false)").run(graph).reports[0].details
    assert bn_nodes(graph) == ["0"]
    reason = details["not_folded"][0]["reason"]
    assert "model input" in reason and "backward: not tried" in reason


# -- random shapes -------------------------------------------------------------------------------
@st.composite
def conv_bn_cases(draw):
    dim = draw(st.integers(1, 3))
    transpose = draw(st.booleans())
    backward = draw(st.booleans()) and not transpose
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    affine = draw(st.booleans())
    if backward:
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        padding = 0 if mode == "zeros" else draw(st.integers(0, 1))
    else:
        mode, padding = "zeros", draw(st.integers(0, 1))
    size = draw(st.integers(max(4, dilation * (kernel - 1) + 2), 7))
    return dict(
        dim=dim, transpose=transpose, backward=backward, groups=groups, cin=cin, cout=cout,
        k=kernel, stride=stride, dil=dilation, bias=bias, affine=affine, mode=mode,
        padding=padding, size=size,
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(case=conv_bn_cases(), seed=st.integers(0, 2**16))
def test_random_conv_bn_shapes_fold_exactly(case, seed):
    dim, cin, cout, k, groups = case["dim"], case["cin"], case["cout"], case["k"], case["groups"]
    backward, padding, affine = case["backward"], case["padding"], case["affine"]
    common = dict(groups=groups, bias=case["bias"], dilation=case["dil"], stride=case["stride"])
    torch.manual_seed(seed)
    if case["transpose"]:
        conv = CONVT[dim](cin, cout, k, padding=padding, **common)
    else:
        conv = CONV[dim](cin, cout, k, padding=padding, padding_mode=case["mode"], **common)
    if backward:
        model = nn.Sequential(BN[dim](cin, affine=affine), conv)
    else:
        model = nn.Sequential(conv, BN[dim](cout, affine=affine))
    model = randomize_bn(model, seed).eval()
    x = torch.randn(2, cin, *([case["size"]] * dim))
    result, details, out, ref = fold(model, x)
    assert_close_rel(out, ref)
    assert bn_nodes(result.graph) == [] and bn_modules(result.graph) == []
    assert details["folded"][0]["direction"] == ("backward" if backward else "forward")


# -- the verifier --------------------------------------------------------------------------------
class PerturbConv(Pass):
    """A deliberately wrong pass: claims to be exact but changes one conv weight."""

    name = "perturb-conv"
    exact = True

    def run(self, graph, ctx):
        with torch.no_grad():
            graph.module.get_submodule("features.2").weight[0].add_(0.5)
        return PassResult(True, {"summary": "perturbed features.2"})


def test_verifier_names_the_wrong_pass_and_the_diverging_node():
    model = nn.Sequential()
    model.features = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )
    model = model.eval()
    graph = graphopt.trace(model, torch.randn(1, 3, 10, 10))
    conv_node = next(n.name for n in graph.nodes if n.target == "features.2")
    # fold-bn first (nothing to fold: unmodified, not blamed), then the wrong pass
    pipeline = graphopt.Pipeline(
        [*graphopt.Pipeline.parse("fold-bn").specs, *graphopt.Pipeline.of(PerturbConv).specs]
    )
    assert str(pipeline) == "fold-bn,perturb-conv"
    with pytest.raises(VerificationError) as info:
        pipeline.run(graph)
    err = info.value
    assert err.pass_name == "perturb-conv"
    assert err.node == conv_node == "features_2"
    assert "'perturb-conv'" in str(err) and "'features_2'" in str(err)


def test_verifier_accepts_fold_bn_on_the_same_model():
    """The control for the test above: an honest exact pass goes through and is verified."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model = randomize_bn(model).eval()
    graph = graphopt.trace(model, torch.randn(1, 3, 10, 10))
    result = graphopt.Pipeline.parse("fold-bn,dce").run(graph)
    assert result.reports[0].verified
    assert result.reports[0].drift["max_abs"] < 1e-4


def test_functional_batch_norm_is_left_alone():
    """F.batch_norm is not a BatchNorm module: nothing to fold, nothing reported."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var)

    graph = graphopt.trace(M().eval(), torch.randn(1, 3, 6, 6))
    result = graphopt.Pipeline.parse("fold-bn").run(graph)
    assert not result.reports[0].modified
    assert result.reports[0].details["folded"] == result.reports[0].details["not_folded"] == []
