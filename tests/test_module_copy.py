"""graphopt.module_copy.copy_module against copy.deepcopy, the ground truth it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from graphopt.module_copy import copy_module


def _tensors(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]


def _same_copy(a: nn.Module, b: nn.Module, original: nn.Module) -> None:
    """``a`` (deepcopy) and ``b`` (copy_module) are equal copies of ``original``."""
    mods_a, mods_b = list(a.named_modules()), list(b.named_modules())
    assert [(n, type(m)) for n, m in mods_a] == [(n, type(m)) for n, m in mods_b]
    for (_, ma), (_, mb), mo in zip(mods_a, mods_b, original.modules()):
        assert mb is not mo
        assert ma.__dict__.keys() == mb.__dict__.keys()
        for k, va in ma.__dict__.items():
            vb = mb.__dict__[k]
            assert type(va) is type(vb), k
            if type(va) in (bool, int, float, str, tuple, type(None)):
                assert va == vb, k
            if isinstance(va, dict) and k not in ("_parameters", "_buffers", "_modules"):
                assert (va is mo.__dict__[k]) == (vb is mo.__dict__[k]), k
    ta, tb, to = _tensors(a), _tensors(b), _tensors(original)
    assert [(n, type(t), t.requires_grad) for n, t in ta] == [
        (n, type(t), t.requires_grad) for n, t in tb
    ]
    for (_, x), (_, y), (_, o) in zip(ta, tb, to):
        assert torch.equal(x, y) and y.data_ptr() != o.data_ptr()
    # aliasing: which tensors are one object, in the deepcopy and in ours
    ids_a = [id(t) for _, t in ta]
    ids_b = [id(t) for _, t in tb]
    assert [ids_a.index(i) for i in ids_a] == [ids_b.index(i) for i in ids_b]


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16", "swin_t", "googlenet"]
)
def test_equals_deepcopy_on_torchvision(name):
    model = getattr(torchvision.models, name)(weights=None).eval()
    _same_copy(copy.deepcopy(model), copy_module(model), model)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.shared = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([self.shared, nn.ReLU(), self.shared])
        self.rnn = nn.LSTM(4, 4)  # its own __setstate__: handed to deepcopy
        self.extra = [self.shared]  # a plain list naming a submodule
        self.scale = torch.tensor(2.0)  # a plain tensor attribute
        self.register_buffer("steps", torch.zeros(()), persistent=False)
        self.padding = (1, 2)

    def forward(self, x):
        return self.head(self.emb(x))


def test_ties_sharing_hooks_and_plain_attributes():
    model = _Tied()
    calls = []
    model.shared.register_forward_hook(lambda m, i, o: calls.append(1))
    c = copy_module(model)
    _same_copy(copy.deepcopy(model), c, model)
    assert c.head.weight is c.emb.weight and c.head.weight is not model.emb.weight
    assert c.blocks[0] is c.blocks[2] is c.shared is c.extra[0]
    assert c.scale is not model.scale and torch.equal(c.scale, model.scale)
    assert "steps" in c._non_persistent_buffers_set
    assert c._non_persistent_buffers_set is not model._non_persistent_buffers_set
    c.shared(torch.zeros(1, 4))
    assert calls == [1]  # the hook was copied
    c.head.weight.data.fill_(3.0)  # writing the copy leaves the original alone
    assert not torch.equal(model.emb.weight, c.emb.weight)
    c.relu_hook = c.blocks[1].register_forward_hook(lambda *a: None)
    assert not model.blocks[1]._forward_hooks  # fresh hook dicts, not the original's


def test_graph_module_goes_through_deepcopy():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    c = copy_module(gm)
    assert isinstance(c, torch.fx.GraphModule) and c.graph is not gm.graph
    x = torch.randn(2, 3)
    assert torch.equal(c(x), gm(x))


def test_deferred_clones_started_before_the_copy():
    """``start(model)`` foresees exactly the parameters the copy aliases (tied ones once, none
    under a module copied by ``copy.deepcopy``), and the finished copy equals a deepcopy."""
    from graphopt.module_copy import DeferredParameters

    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.LSTM(4, 4), nn.Sequential(lin, nn.BatchNorm1d(4)))
    deferred = DeferredParameters()
    deferred.start(model)
    foreseen = [id(p) for p in deferred._sources]
    c = copy_module(model, deferred=deferred)
    assert sorted(foreseen) == sorted(id(p) for _, p, _, _ in deferred._pairs)
    assert len(foreseen) == 4  # lin (tied) and the norm's weight and bias; not the LSTM's
    assert c[0].weight.data_ptr() == lin.weight.data_ptr()  # shared until finished
    deferred.finish(c)
    _same_copy(copy.deepcopy(model), c, model)


@pytest.mark.parametrize("order", [("base", "view"), ("view", "base")])
def test_buffer_views_share_the_copied_storage(order):
    """Buffers are cloned directly where ``Tensor.__deepcopy__`` would give the same; a buffer
    that is a view of another stays a view of the other's copy, in either order."""
    base = torch.arange(6.0)
    model = nn.Module()
    for name in order:
        model.register_buffer(name, base if name == "base" else base[2:4])
    model.register_buffer("steps", torch.tensor(3))
    ours, theirs = copy_module(model), copy.deepcopy(model)
    for c in (ours, theirs):
        c.base[2] = 100.0
        assert c.view.tolist() == [100.0, 3.0]
    assert model.view.tolist() == [2.0, 3.0] and ours.steps.item() == 3
    _same_copy(copy.deepcopy(model), copy_module(model), model)
