"""``fold-bn,dce`` on every torchvision classification model (random weights, eval mode, BNs
given non-trivial statistics): outputs stay within 1e-4 relative of the original model, and
every BN that is foldable by an independent definition is gone."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt

from .zoo import MODELS, build

_BN = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# families whose every BN follows a conv: none may remain
NO_BN_LEFT = ("resnet", "wide_resnet", "resnext", "mobilenet", "efficientnet", "regnet")


def no_bn_left(name: str) -> bool:
    return name.startswith(NO_BN_LEFT) or (name.startswith("vgg") and name.endswith("_bn"))


# the biggest models (over 600M parameters each, ~8 GB peak RSS for the test process): marked so a
# developer can deselect them with -m "not slow"; `make test` still runs them (the whole zoo
# takes 1-4 minutes on 2 cores, most of it these two)
SLOW = {"vit_h_14", "regnet_y_128gf"}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters in a sane but non-trivial range (folding the
    defaults, mean 0 / var 1 / gamma 1 / beta 0, would be exact by accident), and zero-initialised
    heads (ViT) made non-zero so the outputs carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                c = m.num_features
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
            elif isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.02, generator=g)
    return model.eval()


def _zero_padding(conv: nn.Module) -> bool:
    """Does ``conv`` pad its input with zeros?"""
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p != 0 for p in conv.padding)


def foldable_bns(gm: fx.GraphModule) -> list[str]:
    """BN call sites that fold-bn must fold, defined independently of the pass: the input is a
    conv/linear call whose only user is the BN, with matching channels (a linear only on 2-D
    data), or the only user is a conv that does not zero-pad, with matching channels."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        bn = gm.get_submodule(n.target)
        if not isinstance(bn, _BN) or bn.training or not bn.track_running_stats:
            continue
        src = n.args[0]
        if src.op == "call_module" and len(src.users) == 1:
            layer = gm.get_submodule(src.target)
            if isinstance(layer, (*_CONV, *_CONVT)) and layer.out_channels == bn.num_features:
                out.append(str(n.target))
                continue
            if (
                isinstance(layer, nn.Linear)
                and layer.out_features == bn.num_features
                and len(src.meta["graphopt"].shape) == 2
            ):
                out.append(str(n.target))
                continue
        if len(n.users) == 1:
            (user,) = n.users
            if user.op == "call_module":
                layer = gm.get_submodule(user.target)
                if (
                    isinstance(layer, _CONV)
                    and layer.in_channels == bn.num_features
                    and not _zero_padding(layer)
                ):
                    out.append(str(n.target))
    return out


def _bn_call_sites(gm: fx.GraphModule) -> list[str]:
    return [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _BN)
    ]


def test_zoo_is_complete():
    assert len(MODELS) == 80


@pytest.mark.parametrize(
    "name", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in MODELS]
)
def test_fold_bn_dce(name):
    model, x = build(name)
    randomize(model)
    n_bn_modules = sum(isinstance(m, _BN) for m in model.modules())
    with torch.no_grad():
        ref = model(x)
    graph = graphopt.trace(model, x)
    del model
    gc.collect()
    before = _bn_call_sites(graph.module)
    # every traced BN is one call site (auxiliary heads that eval mode skips are not traced)
    assert len(before) == len({p for p, m in graph.module.named_modules() if isinstance(m, _BN)})
    assert bool(before) == bool(n_bn_modules)
    foldable = foldable_bns(graph.module)

    # teacher=graph: neither pass reads a teacher, so skip the default deep copy (GBs on the
    # biggest models); the manager still verifies every modified pass numerically
    result = graphopt.Pipeline.parse("fold-bn,dce").run(graph, teacher=graph)
    fold, dce = result.reports
    with torch.no_grad():
        out = result.graph.module(x)

    scale = float(ref.abs().max())
    assert scale > 0, f"{name}: the output is all zeros, the comparison would be empty"
    err = float((out - ref).abs().max())
    assert err <= 1e-4 * scale, f"{name}: max|Δ| {err:.3e} > 1e-4 * {scale:.3e}"

    gm = result.graph.module
    left = _bn_call_sites(gm)
    folded = {f["bn"] for f in fold.details["folded"]}
    reasons = {e["bn"]: e["reason"] for e in fold.details["not_folded"]}
    missed = sorted(set(foldable) - folded)
    assert not missed, f"{name}: foldable BNs not folded: " + "; ".join(
        f"{b}: {reasons.get(b)}" for b in missed[:5]
    )
    assert not set(foldable) & set(left)
    extra = sorted(folded - set(foldable))
    assert not extra, f"{name}: folded BNs the independent definition does not allow: {extra[:5]}"
    assert set(left) == set(reasons), f"{name}: report and graph disagree"
    assert len(folded) + len(left) == len(before)
    # dce dropped the folded BN modules; only the BNs still called remain as modules
    assert {p for p, m in gm.named_modules() if isinstance(m, _BN)} == set(left)
    for bn, reason in reasons.items():  # both directions explained, naming the neighbour
        assert reason.startswith("forward: ") and "; backward: " in reason, (bn, reason)
    for report in (fold, dce):
        assert report.verified == report.modified
    if no_bn_left(name):
        assert before, f"{name}: expected BatchNorms in this family"
        assert left == [], f"{name}: BNs left: {reasons}"
    del graph, result, gm, ref, out
    gc.collect()
