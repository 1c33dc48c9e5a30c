"""Nothing graphopt does changes the caller's model: after trace, a whole pipeline and
``compress``, every tensor of the model is bit-for-bit what it was (and was never written to),
and the training flags and module structure are the same."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
import torchvision

import graphopt

PIPELINE = "fold-bn,remove-identity,dce"


class ConvBNReLUDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.2),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Identity(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)
        self.bn_fc = nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.bn_fc(self.fc(self.drop(x)))


def _conv_model(training: bool) -> nn.Module:
    torch.manual_seed(0)
    model = ConvBNReLUDropout()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    model.conv_frozen = nn.Conv2d(1, 1, 1)  # an unused submodule dce would delete in the copy
    model.conv_frozen.weight.requires_grad_(False)
    return model.train(training)


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: (v, v.detach().clone(), v._version) for k, v in model.state_dict().items()},
        "params": {n: (p, p.requires_grad) for n, p in model.named_parameters()},
        "modules": [(n, type(m), m.training, id(m)) for n, m in model.named_modules()],
        "children": {n: list(dict(m.named_children())) for n, m in model.named_modules()},
        "repr": repr(model),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def _assert_untouched(model: nn.Module, snap: dict[str, Any]) -> None:
    state = model.state_dict()
    assert list(state) == list(snap["state"])
    for key, (tensor, copy, version) in snap["state"].items():
        now = state[key]
        assert now is tensor or now.data_ptr() == tensor.data_ptr(), f"{key} was replaced"
        assert now.dtype == copy.dtype and now.shape == copy.shape, key
        assert torch.equal(now, copy), f"{key} changed"
        assert now._version == version, f"{key} was written to in place"
    params = dict(model.named_parameters())
    assert list(params) == list(snap["params"])
    for name, (p, requires_grad) in snap["params"].items():
        assert params[name] is p, f"parameter {name} was replaced"
        assert params[name].requires_grad == requires_grad, name
        assert params[name].grad is None, f"{name} got a gradient"
    assert [(n, type(m), m.training, id(m)) for n, m in model.named_modules()] == snap["modules"]
    assert {n: list(dict(m.named_children())) for n, m in model.named_modules()} == snap["children"]
    assert repr(model) == snap["repr"]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == snap["hooks"]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_conv_bn_relu_dropout_untouched_by_trace_and_pipeline(training):
    model = _conv_model(training)
    x = torch.randn(4, 3, 8, 8)
    snap = _snapshot(model)
    graph = graphopt.trace(model, x)
    _assert_untouched(model, snap)
    result = graphopt.Pipeline.parse(PIPELINE).run(graph)
    _assert_untouched(model, snap)
    # the pipeline did real work on its own copy
    reports = {r.name: r for r in result.reports}
    modules = dict(result.graph.module.named_modules())
    assert "conv_frozen" not in modules  # dce removed the unused submodule from the copy
    if training:
        # training-mode BN and active dropout stay; the copy keeps its training flag
        assert not reports["fold-bn"].modified
        assert result.graph.module.training
    else:
        assert reports["fold-bn"].modified and reports["remove-identity"].modified
        assert not any(isinstance(m, nn.BatchNorm2d) for m in result.graph.module.modules())
        # the folded copy's conv weights differ from the caller's, which did not move
        assert not torch.equal(
            result.graph.module.get_submodule("features.0").weight, model.features[0].weight
        )
        with torch.no_grad():
            torch.testing.assert_close(result.graph.module(x), model(x), rtol=1e-4, atol=1e-5)


def test_conv_model_untouched_by_compress():
    model = _conv_model(training=False)
    snap = _snapshot(model)
    result = graphopt.compress(model, PIPELINE, example_inputs=torch.randn(2, 3, 8, 8))
    assert result.reports[0].modified
    _assert_untouched(model, snap)


def test_train_mode_bn_statistics_of_the_caller_do_not_move():
    """Verification runs the copy in training mode (BN updates running stats); the caller's
    buffers must not be those buffers."""
    model = _conv_model(training=True)
    mean = model.features[1].running_mean.clone()
    graph = graphopt.trace(model, torch.randn(4, 3, 8, 8))
    graphopt.Pipeline.parse(PIPELINE).run(graph)
    assert torch.equal(model.features[1].running_mean, mean)
    assert model.features[1].num_batches_tracked.item() == 0
    copy_bn = graph.module.get_submodule("features.1")
    assert copy_bn.num_batches_tracked.item() > 0  # the copy did run in training mode


@pytest.fixture(scope="module")
def resnet():
    return _resnet18()


def test_resnet18_untouched_by_trace_and_pipeline(resnet):
    snap = _snapshot(resnet)
    x = torch.randn(1, 3, 64, 64)
    graph = graphopt.trace(resnet, x)
    _assert_untouched(resnet, snap)
    result = graphopt.Pipeline.parse(PIPELINE).run(graph)
    _assert_untouched(resnet, snap)
    folded = result.reports[0].details["folded"]
    assert len(folded) == 20  # every BN of resnet18 was folded in the copy
    assert any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())


def test_resnet18_untouched_by_compress(resnet):
    snap = _snapshot(resnet)
    result = graphopt.compress(resnet, PIPELINE, example_inputs=torch.randn(1, 3, 64, 64))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.graph.module.modules())
    _assert_untouched(resnet, snap)
