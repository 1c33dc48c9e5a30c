"""Pruning torchvision's Swin Transformer (V1 and V2): attention heads inside the shifted-window
attention that torchvision hides from fx (``torch.fx.wrap``), the FFN widths and the hidden
width (patch embedding, every LayerNorm, patch merging).

Ground truth: zero the output-projection columns of chosen heads; removing exactly those heads
changes nothing. :func:`graphopt.modules.window_attention`, which replaces torchvision's function
once heads are pruned (its head width is an argument, not ``C // heads``), must equal it
bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models import swin_transformer as swin

import graphopt
from graphopt.backends.onnxruntime import check_parity, export
from graphopt.channels import ChannelAnalysis
from graphopt.channels.surgery import member_tensor, remove_units
from graphopt.modules import window_attention

HEADS = [2, 4]
X = torch.randn(2, 3, 36, 28, generator=torch.Generator().manual_seed(0))  # pads to windows


def _swin(v2: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    return swin.SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=HEADS, window_size=[4, 4],
        num_classes=5, stochastic_depth_prob=0.0, **kw,
    ).eval()  # fmt: skip


def _head_groups(ca: ChannelAnalysis) -> list:
    return [g for g in ca.groups if g.heads]


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("shape,shift", [((2, 8, 8, 16), [2, 2]), ((1, 7, 9, 16), [2, 2]), ((2, 4, 4, 16), [2, 2]), ((2, 8, 8, 16), [0, 0])])  # fmt: skip
def test_window_attention_equals_torchvisions(v2, shape, shift):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    c, heads = shape[-1], 2
    w_qkv, w_proj = torch.randn(3 * c, c, generator=g), torch.randn(c, c, generator=g)
    b_qkv, b_proj = torch.randn(3 * c, generator=g), torch.randn(c, generator=g)
    bias = torch.randn(1, heads, 16, 16, generator=g)
    scale = torch.randn(heads, 1, 1, generator=g) if v2 else None
    kw = dict(qkv_bias=b_qkv, proj_bias=b_proj, logit_scale=scale, training=False)
    want = swin.shifted_window_attention(
        x, w_qkv, w_proj, bias, [4, 4], heads, shift_size=shift, **kw
    )
    got = window_attention(x, w_qkv, w_proj, bias, [4, 4], heads, shift, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("v2", [False, True])
def test_swin_heads_ffn_and_hidden_width_are_units(v2):
    g = graphopt.trace(_swin(v2), X)
    assert g.trace_report["frontend"] == "fx"
    ca = ChannelAnalysis(g)
    assert sorted(grp.size for grp in _head_groups(ca)) == [2, 2, 4, 4]
    producers = {p for grp in ca.groups for p in grp.producers}
    assert {"features.0.0", "features.2.reduction", "features.1.0.mlp.0"} <= producers
    assert [r["layer"] for r in ca.locked_summary(limit=0)] == ["head"] * 2  # only the output


@pytest.mark.parametrize("v2", [False, True])
def test_removing_silenced_swin_heads_is_exact(v2):
    g = graphopt.trace(_swin(v2), X)
    ca = ChannelAnalysis(g)
    units = np.concatenate([grp.units[:1] for grp in _head_groups(ca)])  # one head per block
    for m in ca.members:  # zero those heads' columns of the output projection
        if m.owner.endswith("attn.proj") and m.param == "weight" and m.dim == 1:
            idx = np.nonzero(np.isin(ca.units_of(m), units))[0]
            with torch.no_grad():
                member_tensor(g.module, m).index_fill_(1, torch.as_tensor(idx), 0.0)
    with torch.no_grad():
        want = g.module(X)
    remove_units(g, ca, units)
    with torch.no_grad():
        got = g.module(X)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    qkv = [g.module.get_submodule(f"features.{i}.{j}.attn.qkv").weight.shape for i in (1, 3) for j in (0, 1)]  # fmt: skip
    assert [tuple(s) for s in qkv] == [(24, 16), (24, 16), (72, 32), (72, 32)]  # 1 and 3 heads of 8
    calls = [n.target for n in g.module.graph.nodes if n.op == "call_function"]
    assert calls.count(window_attention) == 4 and swin.shifted_window_attention not in calls


@pytest.mark.parametrize("v2", [False, True])
def test_the_pass_prunes_swin_and_it_exports(v2, tmp_path):
    g = graphopt.trace(_swin(v2), X)
    r = graphopt.Pipeline.parse("prune(ratio=0.5)").run(g)
    rep = r.reports[0].details
    assert [(h["heads"], h["removed"]) for h in rep["heads"]] == [(2, 1), (2, 1), (4, 2), (4, 2)]
    m = r.graph.module
    assert m.get_submodule("features.0.0").out_channels == 8  # the hidden width halves too
    assert m.get_submodule("features.3.1.attn.qkv").weight.shape == (48, 16)
    assert m(torch.randn(3, 3, 32, 32)).shape == (3, 5)  # another batch and image size
    parity = check_parity(r.graph, export(r.graph, tmp_path / "swin.onnx"))
    assert parity["rel"] < 1e-4, parity
