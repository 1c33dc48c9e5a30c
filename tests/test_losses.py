"""Distillation losses and adapters against their formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.errors import OptionError
from graphopt.passes.distill.features import ChannelAdapter, FeaturePair, adapter_for
from graphopt.passes.distill.losses import LOSSES, at_loss, get_loss, kd_loss, register_loss


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(2, 12), st.floats(0.5, 8.0), st.integers(0, 2**31 - 1))
def test_kd_matches_torch_kl_div_and_vanishes_on_equal_logits(n, c, t, seed):
    g = torch.Generator().manual_seed(seed)
    s, te = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    ref = F.kl_div(
        F.log_softmax(s / t, 1), F.log_softmax(te / t, 1), log_target=True, reduction="batchmean"
    ) * (t * t)
    torch.testing.assert_close(kd_loss(s, te, t), ref, rtol=1e-5, atol=1e-6)
    assert kd_loss(s, te, t) >= 0
    assert kd_loss(s, s, t).abs() < 1e-6
    # shifting logits by a constant changes no probability
    assert (kd_loss(s + 3.0, te, t) - kd_loss(s, te, t)).abs() < 1e-4


def test_attention_transfer_ignores_channel_count_and_scale():
    x = torch.randn(2, 8, 5, 5)
    assert at_loss(x, x) < 1e-9
    assert at_loss(3 * x, x) < 1e-9  # normalised maps: scale-free
    assert at_loss(x[:, :4], x) > 0  # fewer channels: compared, not refused
    with pytest.raises(ValueError, match="equal spatial sizes"):
        at_loss(x, torch.randn(2, 8, 4, 4))


def test_register_loss_and_unknown_names():
    @register_loss("test-l1")
    def l1(s, t):
        return (s - t).abs().mean()

    try:
        assert get_loss("test-l1") is l1
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test-l1")(lambda s, t: s)
    finally:
        LOSSES.pop("test-l1")
    with pytest.raises(OptionError, match="did you mean 'mse'"):
        get_loss("mes")


def test_adapter_fit_recovers_an_exact_linear_map():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 3, 4, 4, generator=g)
    w, b = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    t = torch.einsum("oc,nchw->nohw", w, s) + b[None, :, None, None]
    a = adapter_for(tuple(s.shape), tuple(t.shape), FeaturePair("s", "t"))
    assert isinstance(a, ChannelAdapter) and a.dim == 1
    a.fit(s, t, ridge=0.0)
    torch.testing.assert_close(a(s), t, rtol=1e-4, atol=1e-4)


def test_adapter_refuses_shapes_that_differ_beyond_channels():
    assert adapter_for((2, 4, 3, 3), (2, 4, 3, 3), FeaturePair("a", "b")) is None
    with pytest.raises(OptionError, match="a:b has shapes"):
        adapter_for((2, 4, 3, 3), (2, 8, 6, 6), FeaturePair("a", "b"))
