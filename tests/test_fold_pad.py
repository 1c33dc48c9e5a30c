"""fold-pad: a zero pad before a conv becomes the conv's padding, outputs unchanged; pads it
cannot fold stay, with the reason."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.passes.fold_pad import FoldPad


class Audio(nn.Module):
    """1-D convs behind explicit zero pads, as audio nets write them."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(1, 8, 5)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1, dilation=2)
        self.pad2 = nn.ConstantPad1d(2, 0.0)

    def forward(self, x):
        h = torch.relu(self.c1(F.pad(x, (2, 2))))
        return self.c2(self.pad2(h))


class Image(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((1, 1, 2, 2))
        self.conv = nn.Conv2d(3, 4, 3, groups=1)

    def forward(self, x):
        p = self.pad(x)
        return self.conv(p), torch.relu(p)  # the pad has another user


def _run(model, x):
    g = graphopt.trace(model.eval(), (x,))
    before = g.module(x)
    result = graphopt.Pipeline.parse("fold-pad").run(g)
    return g, before, result.reports[0]


def test_audio_pads_fold_and_outputs_are_unchanged():
    torch.manual_seed(0)
    model = Audio().eval()
    g, before, rep = _run(model, torch.randn(2, 1, 40))
    assert rep.verified and rep.details["summary"].startswith("folded 2 pads")
    assert g.module.c1.padding == (2,) and g.module.c2.padding == (3,)
    assert not any(n.target is F.pad or n.target == "pad2" for n in g.nodes)
    for x in (torch.randn(3, 1, 40), torch.ones(1, 1, 17) * 3):  # borders matter
        torch.testing.assert_close(g.module(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_shared_pad_stays_for_its_other_user():
    torch.manual_seed(1)
    model = Image().eval()
    x = torch.randn(1, 3, 6, 6)
    g, before, rep = _run(model, x)
    assert g.module.conv.padding == (2, 1)  # (height, width): the pad's last pair is height
    assert any(n.target == "pad" for n in g.nodes)  # still read by the relu
    for a, b in zip(g.module(x), model(x)):
        torch.testing.assert_close(a, b)


class Refused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3)
        self.b = nn.Conv2d(3, 3, 3)
        self.c = nn.Conv2d(3, 3, 3, padding_mode="reflect", padding=1)

    def forward(self, x):
        y = self.a(F.pad(x, (1, 0, 1, 0)))  # asymmetric
        y = self.b(F.pad(y, (1, 1, 1, 1), value=0.5))  # not zeros
        return self.c(F.pad(y, (1, 1, 1, 1)))  # the conv pads with reflect


def test_refused_pads_say_why_and_nothing_changes():
    model = Refused().eval()
    x = torch.randn(1, 3, 9, 9)
    g, before, rep = _run(model, x)
    assert not rep.modified
    reasons = " | ".join(r["reason"] for r in rep.details["refused"])
    assert "asymmetric" in reasons and "reflect" in reasons
    torch.testing.assert_close(g.module(x), model(x))


def test_listed_as_an_exact_pass():
    assert FoldPad.exact and graphopt.get_pass("fold-pad") is FoldPad
