"""``backends/c/opbase.py``: conv/pool window arithmetic (``spatial_params``), the convolution
geometry every conv kernel takes (``ConvGeometry``), and the small ``infer`` helpers."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.backends.c.ir import Node, Tensor, Unsupported
from graphopt.backends.c.opbase import (
    ConvGeometry,
    broadcast_shape,
    const_ints,
    norm_axis,
    spatial_params,
)


def _node(**attrs) -> Node:
    return Node("Conv", "n", ["x", "w"], ["y"], attrs, 17)


# -- spatial_params -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, kernel, attrs, out, pb, pe",
    [
        (5, 3, {}, 3, 0, 0),
        (5, 3, dict(pads=[1, 1]), 5, 1, 1),
        (5, 3, dict(strides=[2], pads=[1, 1]), 3, 1, 1),
        (7, 3, dict(dilations=[3]), 1, 0, 0),  # span 7
        (6, 3, dict(strides=[2], auto_pad="SAME_UPPER"), 3, 0, 1),  # total pad 1: extra at end
        (6, 3, dict(strides=[2], auto_pad=b"SAME_LOWER"), 3, 1, 0),  # bytes as ONNX stores it
        (6, 3, dict(strides=[2], pads=[4, 4], auto_pad="VALID"), 2, 0, 0),  # pads ignored
        (7, 2, dict(strides=[2], pads=[0, 1]), 4, 0, 1),
    ],
)
def test_spatial_params_1d(size, kernel, attrs, out, pb, pe):
    p = spatial_params(_node(**attrs), (1, 1, size), [kernel])
    assert (p["out"], p["pb"], p["pe"]) == ([out], [pb], [pe])
    if "auto_pad" not in attrs:  # the textbook formula
        pads = attrs.get("pads", [0, 0])
        span = attrs.get("dilations", [1])[0] * (kernel - 1) + 1
        assert out == (size + sum(pads) - span) // attrs.get("strides", [1])[0] + 1


def test_spatial_params_2d_keeps_each_axis_apart():
    p = spatial_params(
        _node(strides=[2, 1], dilations=[1, 2], pads=[1, 0, 1, 2]), (1, 3, 10, 9), [3, 2]
    )
    assert p == {
        "strides": [2, 1],
        "dilations": [1, 2],
        "pb": [1, 0],
        "pe": [1, 2],
        "out": [5, 9],
    }


def test_spatial_params_ceil_mode_drops_a_window_starting_in_the_end_padding():
    # 6 wide, window 2, stride 2, one end pad: floor 3, ceil 4 -> but window 4 starts at 6,
    # inside the padding, so it is dropped (as ONNX and PyTorch do)
    node = Node("MaxPool", "p", ["x"], ["y"], dict(strides=[2], pads=[0, 1]), 17)
    assert spatial_params(node, (1, 1, 6), [2], ceil_mode=False)["out"] == [3]
    assert spatial_params(node, (1, 1, 6), [2], ceil_mode=True)["out"] == [3]
    node = Node("MaxPool", "p", ["x"], ["y"], dict(strides=[2]), 17)
    assert spatial_params(node, (1, 1, 7), [2], ceil_mode=True)["out"] == [4]
    assert spatial_params(node, (1, 1, 7), [2], ceil_mode=False)["out"] == [3]


@pytest.mark.parametrize(
    "attrs, x_shape, kernel, match",
    [
        (dict(strides=[0]), (1, 1, 5), [3], "non-positive"),
        (dict(pads=[-1, 0]), (1, 1, 5), [3], "negative pads"),
        (dict(strides=[1, 1]), (1, 1, 5), [3], "do not match the kernel rank"),
        ({}, (1, 1, 5, 5), [3], "does not match input rank"),
        ({}, (1, 1, 2), [3], "output size 0"),
        (dict(auto_pad="WRAP"), (1, 1, 5), [3], "auto_pad='WRAP'"),
    ],
)
def test_spatial_params_rejects(attrs, x_shape, kernel, match):
    with pytest.raises(Unsupported, match=match):
        spatial_params(_node(**attrs), x_shape, kernel)


# -- ConvGeometry -------------------------------------------------------------------------------
def test_conv_geometry_of_a_2d_conv():
    p = spatial_params(_node(strides=[2, 1], pads=[1, 0, 1, 0]), (4, 6, 8, 5), [3, 3])
    geo = ConvGeometry.of((4, 6, 8, 5), (9, 2, 3, 3), p, group=3)
    assert geo == ConvGeometry(4, 6, 8, 5, 9, 4, 3, 3, 3, 2, 1, 1, 1, 1, 0, 3)
    assert all(isinstance(v, int) for v in vars(geo).values())
    assert geo.x_size == 6 * 8 * 5 and geo.y_size == 9 * 4 * 3
    assert not geo.depthwise


def test_conv_geometry_of_a_1d_conv_puts_a_unit_height_first():
    p = spatial_params(_node(strides=[2], dilations=[3], pads=[2, 0]), (1, 4, 16), [3])
    geo = ConvGeometry.of((1, 4, 16), (4, 1, 3), p, group=4)
    assert (geo.H, geo.W, geo.OH, geo.OW, geo.KH, geo.KW) == (1, 16, 1, p["out"][0], 1, 3)
    assert (geo.sh, geo.sw, geo.dh, geo.dw, geo.ph, geo.pw) == (1, 2, 1, 3, 0, 2)
    assert geo.depthwise


def test_conv_geometry_args_are_the_c_kernels_argument_order():
    geo = ConvGeometry(*range(1, 17))  # N=1, C=2, ..., G=16
    assert geo.args() == ", ".join(str(v) for v in range(2, 17))
    # the sparse kernels have KH, KW built in; the depthwise ones have no M, G
    assert geo.args(skip=("KH", "KW")) == "2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16"
    assert geo.args(skip=("M", "G")) == "2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15"
    with pytest.raises(ValueError, match="not convolution arguments"):
        geo.args(skip=("N",))  # the batch is never an argument
    with pytest.raises(ValueError, match="'kh'"):
        geo.args(skip=("kh",))


def test_conv_geometry_is_frozen():
    geo = ConvGeometry(*range(1, 17))
    with pytest.raises(AttributeError):
        geo.C = 3  # type: ignore[misc]


# -- infer helpers ------------------------------------------------------------------------------
def test_broadcast_shape_and_norm_axis():
    assert broadcast_shape((3, 1), (4,), ()) == (3, 4)
    with pytest.raises(Unsupported, match="do not broadcast"):
        broadcast_shape((3,), (4,))
    n = _node()
    assert norm_axis(-1, 4, n) == 3 and norm_axis(0, 0, n) == 0
    with pytest.raises(Unsupported, match="out of range"):
        norm_axis(4, 4, n)


def test_const_ints_needs_a_constant():
    shape = Tensor("s", (2,), np.dtype(np.int64), np.array([3, -1]))
    runtime = Tensor("r", (2,), np.dtype(np.int64))
    assert const_ints([None, shape], 1, "shape") == [3, -1]
    assert const_ints([None], 1, "shape") is None  # an omitted optional input
    with pytest.raises(Unsupported, match="'shape' \\(r\\) must be a constant"):
        const_ints([None, runtime], 1, "shape")
