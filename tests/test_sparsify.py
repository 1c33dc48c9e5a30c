"""The sparsify pass and its masks (graphopt.masks)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt.errors import OptionError, PassFailure
from graphopt.masks import (
    MASKS_KEY,
    Schedule,
    SparsityError,
    magnitude_masks,
    masks_of,
    storage_bytes,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).eval()


X = (torch.randn(4, 3, 6, 6),)


def _run(text: str, model=None, **kw):
    return graphopt.compress(model or _net(), text, example_inputs=X, **kw)


def test_threshold_zero_changes_nothing():
    model = _net()
    result = _run("sparsify(threshold=0)", model)
    assert not result.reports[0].modified
    for k, v in model.state_dict().items():
        assert torch.equal(result.graph.module.state_dict()[k], v)


def test_sparsity_zeroes_floor_s_n_weights_per_layer_and_keeps_the_ends_dense():
    result = _run("sparsify(sparsity=0.7)")
    gm = result.graph.module
    masks = masks_of(gm)
    assert sorted(masks) == ["2.weight", "4.weight", "7.weight"]  # not 0 (first) nor 9 (last)
    for name in masks:
        w = gm.get_parameter(name)
        assert int((w == 0).sum()) == math.floor(0.7 * w.numel()), name
    assert int((gm.get_parameter("0.weight") == 0).sum()) == 0
    skipped = result.reports[0].details["skipped"]
    assert skipped == {"0": "first convolution (keep-ends)", "9": "classifier (keep-ends)"}


def test_ties_are_broken_by_index():
    w = {"a": torch.ones(10)}
    kept = magnitude_masks(w, sparsity=0.3)["a"]
    assert kept.tolist() == [False] * 3 + [True] * 7


def test_global_scope_ranks_across_layers():
    w = {"small": torch.full((10,), 0.1), "large": torch.linspace(1, 2, 10)}
    local = magnitude_masks(w, sparsity=0.5, scope="layer")
    glob = magnitude_masks(w, sparsity=0.45, scope="global")
    assert int((~local["small"]).sum()) == 5 and int((~local["large"]).sum()) == 5
    assert int((~glob["small"]).sum()) == 9 and int((~glob["large"]).sum()) == 0


def test_a_layer_that_would_become_empty_is_refused_by_name():
    with pytest.raises(SparsityError, match="every weight of tiny would be zeroed"):
        magnitude_masks({"tiny": torch.full((4,), 1e-4), "big": torch.ones(4)}, threshold=1e-3)
    with pytest.raises(PassFailure, match=r"every weight of 2\.weight"):
        model = _net()
        with torch.no_grad():
            model[2].weight.mul_(1e-6)
        _run("sparsify(threshold=1e-3)", model)


@pytest.mark.parametrize(
    "text, word",
    [
        ("sparsify(sparsity=1.0)", "sparsity must be in"),
        ("sparsify(sparsity=-0.1)", "sparsity must be in"),
        ("sparsify(threshold=-1)", "threshold must be >= 0"),
        ("sparsify(sparsity=0.5,threshold=0.1)", "not both"),
        ("sparsify(schedule=polynomial,threshold=0.1)", "needs sparsity"),
    ],
)
def test_bad_options_are_clear(text, word):
    with pytest.raises(OptionError, match=word):
        graphopt.Pipeline.parse(text)


def test_blocks_are_kept_or_dropped_whole():
    result = _run("sparsify(sparsity=0.5,block=4)")
    gm = result.graph.module
    for name, mask in masks_of(gm).items():
        flat = mask.reshape(mask.shape[0], -1)
        cols = flat.shape[1] - flat.shape[1] % 4
        blocks = flat[:, :cols].reshape(flat.shape[0], -1, 4)
        assert bool((blocks.all(2) | ~blocks.any(2)).all()), name


@pytest.fixture(scope="module")
def digits():
    from graphopt.zoo.datasets import load_data
    from graphopt.zoo.models import load_model

    return load_model("digits:vgg")[0], load_data("digits")


def test_masks_survive_copy_and_training_keeps_masked_weights_exactly_zero(digits):
    model, data = digits
    result = graphopt.compress(
        model,
        "fold-bn,sparsify(sparsity=0.9),distill(epochs=3)",
        example_inputs=(data.train[0][0][:8],),
        data=data.train,
    )
    gm = result.graph.module
    copied = result.graph.copy().module
    assert masks_of(copied).keys() == masks_of(gm).keys()
    assert masks_of(gm)
    for name, mask in masks_of(gm).items():
        w = gm.get_parameter(name)
        assert bool((w[~mask] == 0).all()), name
        assert int((w != 0).sum()) <= mask.sum()
    from graphopt.zoo.digits import evaluate

    assert evaluate(gm, data.test) > 0.9


def test_polynomial_schedule_reaches_the_target_during_distill(digits):
    model, data = digits
    result = graphopt.compress(
        model,
        "fold-bn,sparsify(sparsity=0.8,schedule=polynomial),distill(epochs=4)",
        example_inputs=(data.train[0][0][:8],),
        data=data.train,
    )
    gm = result.graph.module
    for name, mask in masks_of(gm).items():
        w = gm.get_parameter(name)
        assert int((~mask).sum()) == math.floor(0.8 * w.numel()), name
        assert bool((w[~mask] == 0).all())
    assert "graphopt.sparsity_schedule" not in gm.meta
    s = Schedule(final=0.8, epochs=4)
    assert s.at(0) == 0.0 and s.at(4) == pytest.approx(0.8) and s.at(2) < 0.8


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=2000))
def test_storage_estimates(bits):
    mask = torch.tensor(bits)
    nnz = int(mask.sum())
    s = storage_bytes(mask, 1)
    assert s["dense"] == len(bits)
    assert s["bitmap"] == (len(bits) + 7) // 8 + nnz
    assert s["relative"] >= 2 * nnz  # a byte of value and a byte of index per non-zero, at least


def test_masks_are_kept_in_module_meta():
    gm = _run("sparsify(sparsity=0.5)").graph.module
    assert MASKS_KEY in gm.meta
