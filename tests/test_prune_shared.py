"""Pruning shared modules and convs fed through a reshape of a linear's output.

A module called at several places (the same conv applied twice, a whole block applied twice, a
recurrent cell, a siamese encoder, ALBERT's one layer used at every depth) is one coupled unit:
its output channels go with the consumers at every call site, its input channels with the
producers at every call site, and its parameters are sliced once. A conv reading
``fc(z).view(B, C, H, W)`` (a generator / decoder) keeps its own output channels free, and the
linear's ``H·W`` features of channel ``c`` go with the conv's input channel ``c``.

Ground truth as in ``test_prune``: zero every consumer weight that reads the chosen units, then
remove exactly those units: the outputs must not move (relative 1e-5), the weights must shrink
and the ONNX export must keep parity.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.backends.onnxruntime import check_parity, export
from graphopt.channels import ChannelAnalysis
from graphopt.channels.surgery import apply_plan, remove_units

from .channel_helpers import randomize_bn, zero_unit_inputs


def _first(out) -> torch.Tensor:
    if isinstance(out, dict):
        out = list(out.values())
    return out if isinstance(out, torch.Tensor) else out[0]


def _run(g: graphopt.Graph, x: tuple) -> torch.Tensor:
    with torch.no_grad():
        return _first(g.module(*x))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max() / b.abs().max())


def _pick(ca: ChannelAnalysis, seed: int = 0) -> np.ndarray:
    """Half of every group's units (groups feeding norm statistics excluded: zeroing their
    consumers does not silence them)."""
    rng = np.random.default_rng(seed)
    units = [
        rng.choice(grp.units, grp.size // 2, replace=False)
        for grp in ca.groups
        if not grp.stats_coupled and grp.size > 1
    ]
    return np.concatenate(units) if units else np.zeros(0, dtype=np.int64)


def _zero_and_remove(g: graphopt.Graph, x: tuple, tmp_path=None) -> ChannelAnalysis:
    ca = ChannelAnalysis(g)
    units = _pick(ca)
    assert len(units), ca.locked_summary()
    zero_unit_inputs(g, ca, units)
    ref = _run(g, x)
    before = sum(p.numel() for p in g.module.parameters())
    remove_units(g, ca, units)
    assert _rel(_run(g, x), ref) < 1e-5
    assert sum(p.numel() for p in g.module.parameters()) < before
    if tmp_path is not None:
        parity = check_parity(g, export(g, tmp_path / "pruned.onnx"))
        assert parity["ok"], parity
    return ca


def _producers(ca: ChannelAnalysis) -> list[set[str]]:
    return [set(grp.producers) for grp in ca.groups]


# -- shared modules ---------------------------------------------------------------------------------
class SharedConv(nn.Module):
    """The same conv applied twice in a row (a BatchNorm between the two calls)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.shared(x)))
        return self.head(torch.relu(self.shared(x)))


class SharedBlock(nn.Module):
    """A whole residual block applied twice (weight tying across depth)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 12, 1)
        )
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        x = torch.relu(x + self.block(x))
        return self.fc(x.mean((2, 3)))


class Recurrent(nn.Module):
    """A recurrent cell: the same linear applied three times to its own output."""

    def __init__(self):
        super().__init__()
        self.enc, self.cell, self.dec = nn.Linear(6, 24), nn.Linear(24, 24), nn.Linear(24, 3)

    def forward(self, x):
        e = self.enc(x)
        h = torch.tanh(e)
        for _ in range(3):
            h = torch.tanh(self.cell(h) + e)
        return self.dec(h)


class Siamese(nn.Module):
    """Two inputs through one encoder; the features concatenated."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(3, 10, 3, padding=1),
            nn.BatchNorm2d(10),
            nn.ReLU(),
            nn.Conv2d(10, 14, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(28, 2)

    def forward(self, a, b):
        fa, fb = self.enc(a).mean((2, 3)), self.enc(b).mean((2, 3))
        return self.fc(torch.cat([fa, fb], 1))


class TwoScales(nn.Module):
    """A conv shared across two resolutions (a shared detection head over a pyramid)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 1))

    def forward(self, x):
        f1 = torch.relu(self.c1(x))
        f2 = torch.relu(self.c2(f1))
        return torch.cat([self.head(f1).flatten(2), self.head(f2).flatten(2)], 2)


IMG = torch.randn(2, 3, 8, 8)
SHARED = {
    "conv": (SharedConv, (IMG,), [{"shared", "stem"}]),
    "block": (SharedBlock, (IMG,), [{"stem.0", "block.3"}, {"block.0"}]),
    "recurrent": (Recurrent, (torch.randn(4, 6),), [{"enc", "cell"}]),
    "siamese": (Siamese, (IMG, torch.randn(2, 3, 8, 8)), [{"enc.0"}, {"enc.3"}]),
    "two_scales": (TwoScales, (IMG,), [{"c1", "c2"}, {"head.0"}]),
}


@pytest.mark.parametrize("frontend", ["fx", "concrete", "export"])
@pytest.mark.parametrize("name", sorted(SHARED))
def test_a_shared_module_is_one_unit_and_prunes_exactly(name, frontend, tmp_path):
    cls, x, groups = SHARED[name]
    torch.manual_seed(0)
    g = graphopt.trace(randomize_bn(cls()), x, frontend=frontend)
    ca = ChannelAnalysis(g)
    assert sorted(map(sorted, _producers(ca))) == sorted(map(sorted, groups)), ca.locked_summary()
    assert not any("places" in r["reason"] for r in ca.locked_summary(limit=0))
    _zero_and_remove(g, x, tmp_path)
    bigger = tuple(torch.cat([t] * 3) for t in x)
    assert _run(g, bigger).shape[0] == 3 * x[0].shape[0]


def test_a_shared_conv_is_sliced_once_and_scored_once():
    g = graphopt.trace(randomize_bn(SharedConv()), IMG)
    ca = ChannelAnalysis(g)
    slots = [(m.owner, m.param, m.dim, m.kind) for m in ca.members if m.owner == "shared"]
    assert len(slots) == len(set(slots))  # the second call site is coupled, not re-stated
    (grp,) = ca.groups
    remove_units(g, ca, grp.units[:3])
    m = g.module.shared
    assert tuple(m.weight.shape) == (5, 5, 3, 3) and (m.in_channels, m.out_channels) == (5, 5)
    assert g.module.bn.num_features == 5 and g.module.head.in_channels == 5


@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_the_pass_prunes_a_shared_block_and_the_plan_replays(importance, tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(SharedBlock())
    g = graphopt.trace(model, IMG)
    data = [(torch.randn(4, 3, 8, 8),) for _ in range(2)]
    r = graphopt.Pipeline.parse(f"prune(ratio=0.5,importance={importance})").run(g, data=data)
    m = r.graph.module
    conv1, conv2, stem = (m.get_submodule(p) for p in ("block.0", "block.3", "stem.0"))
    assert (conv1.out_channels, conv2.out_channels, stem.out_channels) == (8, 6, 6)
    assert conv1.in_channels == 6 and m.fc.in_features == 6
    fresh = SharedBlock().eval()
    apply_plan(fresh, r.reports[0].details["plan"])
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMG), m(IMG))
    parity = check_parity(r.graph, export(r.graph, tmp_path / "shared.onnx"))
    assert parity["ok"], parity


def test_hugging_face_albert_prunes_its_shared_layer():
    """ALBERT applies one transformer layer at every depth: its heads and FFN are one unit per
    head / channel across all three call sites, sliced once."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AlbertConfig(
        vocab_size=100, embedding_size=32, hidden_size=64, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(1))
    g = graphopt.trace(transformers.AlbertModel(cfg).eval(), {"input_ids": ids})
    ca = ChannelAnalysis(g)
    layer = "encoder.albert_layer_groups.0.albert_layers.0"
    sizes = {(grp.size, grp.heads) for grp in ca.groups if layer + ".ffn" in grp.producers}
    assert sizes == {(128, False)}
    assert [grp.size for grp in ca.groups if grp.heads] == [4]
    _zero_and_remove(g, (ids,))
    attn = g.module.get_submodule(layer + ".attention")
    assert tuple(attn.query.weight.shape) == (32, 64) and tuple(attn.dense.weight.shape) == (64, 32)
    assert tuple(g.module.get_submodule(layer + ".ffn").weight.shape) == (64, 64)


# -- a conv reading a reshape of a linear's output -------------------------------------------------------
class Generator(nn.Module):
    """DCGAN-style: ``fc(z)`` viewed as ``[B, C, 4, 4]``, norm, (transposed) convs."""

    def __init__(self, view: str, transpose: bool):
        super().__init__()
        self.view = view
        self.fc = nn.Linear(16, 8 * 4 * 4)
        self.bn0 = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 12, 4, 2, 1) if transpose else nn.Conv2d(8, 12, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(12)
        self.out = nn.Conv2d(12, 3, 3, padding=1)

    def forward(self, z):
        h = self.fc(z)
        if self.view == "view":
            x = h.view(z.shape[0], 8, 4, 4)
        elif self.view == "reshape":
            x = h.reshape(-1, 8, 4, 4)
        else:
            x = h.unflatten(1, (8, 4, 4))
        x = torch.relu(self.bn0(x))
        return torch.tanh(self.out(torch.relu(self.bn1(self.up(x)))))


class ResidualDecoder(nn.Module):
    """``x = fc(z).view(B, C, H, W)``, then ``x + conv(x)``: the conv's output channels are
    coupled with the linear's channel blocks."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 6 * 3 * 3)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, z):
        x = self.fc(z).view(-1, 6, 3, 3)
        return self.out(torch.relu(x + self.conv(x)))


Z = torch.randn(3, 16)


@pytest.mark.parametrize(
    "view,transpose,frontend",
    [
        ("view", True, "fx"),
        ("reshape", True, "fx"),
        ("unflatten", True, "fx"),
        ("view", False, "fx"),
        ("view", False, "export"),
        ("view", True, "export"),
        ("reshape", True, "export"),
        ("unflatten", False, "export"),
        ("view", True, "concrete"),
        ("unflatten", False, "concrete"),
    ],
)
def test_a_conv_after_a_reshaped_linear_keeps_its_channels(view, transpose, frontend, tmp_path):
    torch.manual_seed(0)
    g = graphopt.trace(randomize_bn(Generator(view, transpose)), Z, frontend=frontend)
    ca = ChannelAnalysis(g)
    assert _producers(ca) == [{"fc"}, {"up"}], ca.locked_summary()
    (fc_group,) = [grp for grp in ca.groups if grp.producers == ["fc"]]
    assert fc_group.size == 8  # a unit: the 16 features of one channel block
    _zero_and_remove(g, (Z,), tmp_path)
    m = g.module
    assert m.fc.out_features == 4 * 16 and m.bn0.num_features == 4
    want = (4, 6) if transpose else (6, 4)  # ConvTranspose weights are [in, out, ...]
    assert tuple(m.up.weight.shape[:2]) == want and m.bn1.num_features == 6


@pytest.mark.parametrize("frontend", ["fx", "concrete", "export"])
def test_a_residual_decoder_couples_the_conv_with_the_linear(frontend, tmp_path):
    torch.manual_seed(0)
    g = graphopt.trace(ResidualDecoder().eval(), (torch.randn(2, 10),), frontend=frontend)
    ca = ChannelAnalysis(g)
    assert _producers(ca) == [{"fc", "conv"}], ca.locked_summary()
    _zero_and_remove(g, (torch.randn(2, 10),), tmp_path)
    assert g.module.fc.out_features == 3 * 9 and g.module.conv.out_channels == 3
