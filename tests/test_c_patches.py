"""Memory below the layer-by-layer bound: in-place depthwise convolution and patch-based
execution of the first stages (``emit(..., patches=N)`` / ``ram_budget=BYTES``).

The ground truth is the plain C (no patches; for in-place, the layer-by-layer plan): every
variant must give the same output bit for bit, float and int8 (ORT ``quantize_static`` QDQ),
on a small MobileNetV2-like net (stride-2 stages, a residual block, 3x3 and 5x5 depthwise
convs) at odd input sizes the patch grids do not divide evenly, so patches have different
sizes and their borders cut through padded windows. The reported peak must go down."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import graphopt
from graphopt.backends.c import OPS, compile_program, emit, patches, planner
from graphopt.backends.c.build import CModel, compile_shared
from graphopt.backends.onnxruntime import export, ort_quantize_static
from graphopt.errors import BackendError

FLAGS = ("-O3", "-march=native")


def _cbr(cin, cout, k=3, s=1, g=1):
    return [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]


class _Block(nn.Module):
    """MobileNetV2's inverted residual: expand 1x1, depthwise kxk (stride s), project 1x1."""

    def __init__(self, cin, cout, s, t, k=3):
        super().__init__()
        mid = cin * t
        layers = []
        if t != 1:
            layers += [*_cbr(cin, mid, 1), nn.ReLU6()]
        layers += [*_cbr(mid, mid, k, s, mid), nn.ReLU6(), *_cbr(mid, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.res else y


class _TinyMBv2(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            *_cbr(3, 8, 3, 2),
            nn.ReLU6(),
            _Block(8, 8, 1, 1),
            _Block(8, 8, 2, 3, k=5),
            _Block(8, 8, 1, 3),  # residual
            _Block(8, 16, 2, 3),
            _Block(16, 16, 1, 2),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.2
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.2
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    return model.eval()


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """{kind: (onnx path, input)} for kind float and int8, input 1x3x37x43."""
    root = tmp_path_factory.mktemp("patch-nets")
    model = _randomize(_TinyMBv2())
    x = torch.randn(1, 3, 37, 43)
    path = root / "tiny.onnx"
    export(graphopt.trace(model, (x,)), path, dynamic_batch=False)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal(tuple(x.shape)).astype(np.float32) for _ in range(8)]
    q = ort_quantize_static(path, root / "tiny_int8.onnx", calib)
    return {"float": (path, x.numpy()), "int8": (q, x.numpy())}


def _build(root: Path, variants: dict[str, tuple]) -> dict[str, CModel]:
    """Emit each ``{c_name: (model, emit kwargs)}`` and compile them into one library."""
    reports, sources = {}, []
    for name, (model, kw) in variants.items():
        reports[name] = emit(model, root / name, name=name, **kw)
        sources += [root / name / f"{name}.c", root / name / f"{name}_weights.c"]
    lib = root / "libpatches.so"
    compile_shared(sources, lib, flags=FLAGS)
    handle = ctypes.CDLL(str(lib))
    return {name: CModel(lib, rep, lib=handle) for name, rep in reports.items()}


def _inputs(x: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [x, rng.standard_normal(x.shape).astype(np.float32) * 3]


def _same(a: CModel, b: CModel, x: np.ndarray) -> None:
    for xi in _inputs(x):
        (ya,), (yb,) = a.run(xi), b.run(xi)
        assert np.array_equal(ya, yb), (a.name, b.name, np.abs(ya - yb).max())


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_patched_and_in_place_match_the_plain_c(nets, kind, tmp_path, monkeypatch):
    model, x = nets[kind]
    variants = {f"p{n}": (model, {"patches": n}) for n in (2, 3, 4)}
    variants["inplace"] = (model, {})
    built = _build(tmp_path / "a", variants)
    # the layer-by-layer plan: no kernel writes over its input
    plain = planner.plan
    monkeypatch.setattr(
        planner, "plan", lambda prog, ops, kernels_inplace=True: plain(prog, ops, False)
    )
    base = _build(tmp_path / "b", {"base": (model, {})})["base"]
    monkeypatch.undo()

    ip = built["inplace"]
    _same(base, ip, x)
    mem = ip.report["memory"]
    assert base.arena_bytes == mem["arena_layer_by_layer_bytes"]
    assert mem["arena_in_place_bytes"] == ip.arena_bytes <= base.arena_bytes
    if kind == "float":  # int8: the stem conv's im2col scratch is the peak either way
        assert ip.arena_bytes < base.arena_bytes
    assert ip.report["in_place_ops"] > base.report["in_place_ops"]
    assert ip.report["patches"] is None

    for n in (2, 3, 4):
        c = built[f"p{n}"]
        _same(base, c, x)
        rep, info = c.report, c.report["patches"]
        assert info["grid"] == [n, n]
        assert rep["memory"]["arena_bytes"] == c.arena_bytes < ip.arena_bytes
        assert info["arena_unpatched_bytes"] == ip.arena_bytes
        assert info["extra_macs"] > 0 and 0 < info["recompute_pct"] < 100
        h, w = info["cut_shape"][2:]
        assert h >= n and w >= n
        # the clones of a node share its weights (a tile too small for the kernel the whole
        # image uses may pack them for another)
        assert rep["weight_bytes"] < 2 * ip.weight_bytes
        assert rep["op_counts"] == ip.report["op_counts"]


def _prepared(model):
    prog = compile_program(model)
    for node in prog.nodes:
        OPS[node.op].prepare(node, prog.tensors, True)
    return prog


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_every_cut_is_bit_exact(nets, kind, tmp_path, monkeypatch):
    """Each valid cut (a stage ending in a stride-2 conv, in a residual Add whose skip input
    is cropped from a larger tile, ...) with a 3 x 3 grid of uneven patches."""
    model, x = nets[kind]
    prog = _prepared(model)
    cuts, _ = patches.cut_points(prog)
    assert len(cuts) >= 8
    assert any(prog.nodes[c].op in ("Add", "QAdd_i8") for c in cuts)
    # every other cut, and every cut at a residual Add (keeps the compile short)
    picked = sorted(set(cuts[::2]) | {c for c in cuts if prog.nodes[c].op in ("Add", "QAdd_i8")})
    names = []
    for c in picked:
        shape = prog.t(prog.nodes[c].outputs[0]).shape
        if min(shape[2:]) >= 3:
            # emit while only this cut is offered
            monkeypatch.setattr(patches, "cut_points", lambda p, c=c: ([c], ""))
            names.append(f"cut{c}")
            emit(model, tmp_path / names[-1], name=names[-1], patches=3)
    monkeypatch.undo()
    names.append("plain")
    emit(model, tmp_path / "plain", name="plain")
    sources = [tmp_path / n / f"{n}{s}.c" for n in names for s in ("", "_weights")]
    lib = tmp_path / "libcuts.so"
    compile_shared(sources, lib, flags=FLAGS)
    handle = ctypes.CDLL(str(lib))
    models = {
        n: CModel(lib, json.loads((tmp_path / n / "report.json").read_text()), lib=handle)
        for n in names
    }
    crops = 0
    for n, c in models.items():
        if n == "plain":
            continue
        assert c.report["patches"]["cut_step"] == int(n[3:])
        _same(models["plain"], c, x)
        crops += ">" in (tmp_path / n / f"{n}.c").read_text()
    assert crops > 0  # some stage had a residual whose skip tile was cropped


def test_ram_budget_picks_grid_and_cut(nets, tmp_path):
    model, x = nets["int8"]
    plain = emit(model, tmp_path / "plain", name="plain")
    budget = plain["arena_bytes"] * 6 // 10
    rep = emit(model, tmp_path / "b", name="b", ram_budget=budget)
    assert rep["arena_bytes"] <= budget and rep["patches"] is not None
    # a budget the plain plan meets: no patches
    free = emit(model, tmp_path / "f", name="f", ram_budget=plain["arena_bytes"])
    assert free["patches"] is None and free["arena_bytes"] == plain["arena_bytes"]
    built = _build(
        tmp_path / "c", {"plainc": (model, {}), "budget": (model, {"ram_budget": budget})}
    )
    _same(built["plainc"], built["budget"], x)


def test_bad_requests_name_the_option(nets, tmp_path):
    model, _ = nets["float"]
    with pytest.raises(BackendError, match=r"ram_budget=100\b.*cannot be met"):
        emit(model, tmp_path / "a", ram_budget=100)
    with pytest.raises(BackendError, match=r"patches=40\b"):
        emit(model, tmp_path / "b", patches=40)  # no cut tensor has 40 rows
    with pytest.raises(BackendError, match=r"patches=0"):
        emit(model, tmp_path / "c", patches=0)
    # a model that starts with a fully-connected layer has no cut point
    w = numpy_helper.from_array(np.ones((16, 16), np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 1, 4, 4], np.int64), "shape")
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Reshape", ["m", "shape"], ["r"]),
            helper.make_node("Conv", ["r", "k"], ["y"], pads=[1, 1, 1, 1]),
        ],
        "fc_first",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, shape, numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "k")],
    )
    fc = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BackendError, match=r"patches=2: the model has no cut point.*MatMul"):
        emit(fc, tmp_path / "d", patches=2)


def test_tile_geometry_keeps_the_image_padding():
    """A 3x3 stride-2 pad-1 conv over 11 rows: the patches' input windows overlap (the halo)
    and only the first tile keeps the top pad."""
    from graphopt.backends.c.opbase import ConvGeometry

    geo = ConvGeometry(1, 4, 11, 11, 4, 6, 6, 3, 3, 2, 2, 1, 1, 1, 1, 4)
    boxes = patches.grid((1, 4, 6, 6), 2)
    assert [b.h for b in boxes] == [3, 3, 3, 3]
    ins = [patches._conv_in(geo, b) for b in boxes]
    assert (ins[0].r0, ins[0].r1) == (0, 6) and (ins[2].r0, ins[2].r1) == (5, 11)
    tiles = [patches._tile_geo(geo, i, b) for i, b in zip(ins, boxes)]
    assert [t.ph for t in tiles] == [1, 1, 0, 0] and [t.pw for t in tiles] == [1, 0, 1, 0]
    assert all(t.OH == 3 and t.H == 6 for t in tiles)


def test_build_passes_patches_through(nets):
    from graphopt.backends.c import build

    model, x = nets["float"]
    plain, patched = build(model, flags=("-O2",)), build(model, flags=("-O2",), patches=2)
    assert patched.report["patches"]["grid"] == [2, 2]
    assert patched.arena_bytes < plain.arena_bytes
    (a,), (b,) = plain.run(x), patched.run(x)
    assert np.array_equal(a, b)
