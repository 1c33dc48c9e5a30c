"""The ONNX Runtime backend: export (parity, dynamic batch, module paths, atomic writes, errors),
sessions, parity checks and benchmarks."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.backends import onnx_export
from graphopt.backends import onnxruntime as gort
from graphopt.data import probe_inputs

torchvision = pytest.importorskip("torchvision")


# -- models -------------------------------------------------------------------------------------
class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a wrong Conv+BN fusion changes the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


class Boom(nn.Module):
    """Runs during tracing; raises once armed (so the export fails)."""

    armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("boom: refusing to export")
        return x * 2


class BoomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.boom = Boom()

    def forward(self, x):
        return self.boom(self.conv(x))


@torch.library.custom_op("graphopt_test::no_onnx", mutates_args=())
def no_onnx(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@no_onnx.register_fake
def _(x):
    return torch.empty_like(x)


class CustomOpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return no_onnx(self.conv(x))


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, y):
        h = self.a(x) + self.b(y)
        return h, self.head(h)


class SignBranch(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class BranchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.branch = SignBranch()

    def forward(self, x):
        return self.branch(self.fc(x))


def _max_rel(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


def _props(proto_node) -> dict[str, str]:
    return {p.key: p.value for p in proto_node.metadata_props}


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    graph = graphopt.trace(_randomize_bn(SmallNet()), torch.randn(2, 3, 16, 16))
    path = gort.export(graph, tmp_path_factory.mktemp("small") / "small.onnx")
    return graph, path


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.resnet18())
    graph = graphopt.trace(model, torch.randn(1, 3, 64, 64))
    path = gort.export(graph, tmp_path_factory.mktemp("r18") / "resnet18.onnx")
    return model, graph, path


# -- export: numerics ---------------------------------------------------------------------------
def test_small_net_matches_torch(small):
    graph, path = small
    x = torch.randn(2, 3, 16, 16)
    (got,) = gort.run(path, x)
    with torch.no_grad():
        want = graph.module(x)
    assert got.shape == (2, 10)
    assert _max_rel(got, want) <= 1e-4


def test_resnet18_matches_torch(resnet):
    model, graph, path = resnet
    x = torch.randn(1, 3, 64, 64)
    (got,) = gort.run(path, x)
    with torch.no_grad():
        want = model(x)  # the user's model, not just the traced copy
    assert got.shape == (1, 1000)
    assert _max_rel(got, want) <= 1e-4


def test_dynamic_batch_runs_other_batch_sizes(resnet):
    model, graph, path = resnet
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.example_inputs[0].shape[0] == 1
    x = torch.randn(3, 3, 64, 64)
    (got,) = gort.run(path, x)
    with torch.no_grad():
        want = model(x)
    assert got.shape == (3, 1000)
    assert _max_rel(got, want) <= 1e-4


def test_static_batch_on_request(small, tmp_path):
    graph, _ = small
    path = gort.export(graph, tmp_path / "static.onnx", dynamic_batch=False)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert {p.key: p.value for p in proto.metadata_props}["graphopt.dynamic_batch"] == "false"
    with pytest.raises(graphopt.BackendError):
        gort.run(path, torch.randn(3, 3, 16, 16))


def test_several_inputs_and_outputs(tmp_path):
    graph = graphopt.trace(TwoInTwoOut().eval(), (torch.randn(2, 8), torch.randn(2, 8)))
    path = gort.export(graph, tmp_path / "two.onnx")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_0", "input_1"]
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    h, out = gort.run(path, x, y)
    with torch.no_grad():
        want_h, want_out = graph.module(x, y)
    assert _max_rel(h, want_h) <= 1e-4 and _max_rel(out, want_out) <= 1e-4
    paths = {_props(n)["graphopt.module_path"] for n in proto.graph.node if n.op_type == "Gemm"}
    assert paths == {"a", "b", "head"}


# -- export: metadata ---------------------------------------------------------------------------
def test_compute_nodes_carry_torch_module_paths(resnet):
    model, _, path = resnet
    proto = onnx.load(str(path))
    compute = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert compute
    for n in compute:
        assert _props(n).get("graphopt.module_path"), f"{n.op_type} {n.name} has no module path"
    conv_paths = {_props(n)["graphopt.module_path"] for n in compute if n.op_type == "Conv"}
    torch_convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {"conv1", "layer1.0.conv1", "layer4.1.conv2", "layer2.0.downsample.0"} <= conv_paths
    assert conv_paths == torch_convs  # one ONNX Conv per torch conv, none named after its BN
    assert [_props(n)["graphopt.module_path"] for n in compute if n.op_type == "Gemm"] == ["fc"]


def test_no_stack_traces_or_local_paths_in_the_file(resnet):
    _, _, path = resnet
    proto = onnx.load(str(path))
    keys = {k for n in proto.graph.node for k in _props(n)}
    assert "graphopt.module_path" in keys
    assert not keys & {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy"}
    assert b"site-packages" not in proto.SerializeToString()


def test_fused_batchnorm_recorded_in_provenance(resnet, small):
    for path in (resnet[2], small[1]):
        proto = onnx.load(str(path))
        assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
        convs = {
            _props(n)["graphopt.module_path"]: _props(n)
            for n in proto.graph.node
            if n.op_type == "Conv"
        }
        if path == small[1]:
            assert convs["conv2"]["graphopt.provenance"] == "conv2,bn2"
            assert convs["conv2"]["graphopt.node"] == "conv2"
        else:
            assert convs["layer1.0.conv1"]["graphopt.provenance"] == "layer1.0.conv1,layer1.0.bn1"


def test_residual_adds_carry_block_paths(resnet):
    _, _, path = resnet
    proto = onnx.load(str(path))
    adds = [_props(n)["graphopt.module_path"] for n in proto.graph.node if n.op_type == "Add"]
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert sorted(adds) == blocks


def test_model_metadata(small, tmp_path):
    graph, path = small
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["graphopt.version"] == graphopt.__version__
    assert props["graphopt.dynamic_batch"] == "true"
    assert "graphopt.pipeline" not in props
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]

    g2 = graph.copy()
    g2.module.meta["graphopt.pipeline"] = "fold-bn,dce"
    p2 = gort.export(g2, tmp_path / "meta.onnx")
    assert {p.key: p.value for p in onnx.load(str(p2)).metadata_props}["graphopt.pipeline"] == (
        "fold-bn,dce"
    )
    p3 = gort.export(g2, tmp_path / "meta2.onnx", pipeline="dce")
    assert {p.key: p.value for p in onnx.load(str(p3)).metadata_props}["graphopt.pipeline"] == (
        "dce"
    )


# -- export: files and errors -------------------------------------------------------------------
def test_export_replaces_existing_file_without_leftovers(small, tmp_path):
    graph, _ = small
    target = tmp_path / "model.onnx"
    target.write_bytes(b"stale")
    gort.export(graph, target)
    onnx.checker.check_model(onnx.load(str(target)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_failed_export_leaves_existing_file_and_raises(tmp_path):
    graph = graphopt.trace(BoomNet().eval(), torch.randn(1, 3, 8, 8), leaf_modules=[Boom])
    graph.module.boom.armed = True
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(graphopt.BackendError) as info:
        gort.export(graph, target)
    msg = str(info.value)
    assert "\n" not in msg
    assert "'boom'" in msg and "refusing to export" in msg
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_large_models_keep_weights_beside_the_file(small, tmp_path, monkeypatch):
    graph, _ = small
    monkeypatch.setattr(onnx_export, "_SINGLE_FILE_LIMIT", 0)  # pretend the weights exceed 2 GB
    path = gort.export(graph, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert gort.check_parity(graph, path)["ok"]


def test_write_failure_midway_leaves_existing_file(small, tmp_path, monkeypatch):
    import onnx_ir

    graph, _ = small
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")

    def half_save(model, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_ir, "save", half_save)
    with pytest.raises(graphopt.BackendError, match="cannot write"):
        gort.export(graph, target)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_unsupported_op_error_names_the_op(tmp_path):
    graph = graphopt.trace(CustomOpNet().eval(), torch.randn(1, 3, 8, 8))
    with pytest.raises(graphopt.BackendError) as info:
        gort.export(graph, tmp_path / "m.onnx")
    msg = str(info.value)
    assert "\n" not in msg and "graphopt_test.no_onnx" in msg
    assert not (tmp_path / "m.onnx").exists()


def test_torchscript_fallback_for_untraceable_leaf(tmp_path, caplog):
    torch.manual_seed(0)
    net = BranchNet().eval()
    x_pos = torch.randn(2, 8)
    with torch.no_grad():  # choose inputs that take each branch
        sign = net.fc(x_pos).sum().sign()
    graph = graphopt.trace(net, x_pos, leaf_modules=[SignBranch])
    with pytest.raises(graphopt.BackendError, match="branch.*allow_torchscript=True"):
        gort.export(graph, tmp_path / "branch.onnx")  # a silently frozen branch: refused
    assert not (tmp_path / "branch.onnx").exists()
    with caplog.at_level(logging.WARNING, logger="graphopt.backends.onnxruntime"):
        path = gort.export(graph, tmp_path / "branch.onnx", allow_torchscript=True)
    assert "TorchScript" in caplog.text
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["graphopt.exporter"] == "torch.onnx (torchscript)"
    assert gort.check_parity(graph, path)["ok"]
    # the trace froze the example's branch: parity must catch inputs taking the other one
    flipped = None
    for _ in range(50):
        cand = torch.randn(2, 8) * 3
        with torch.no_grad():
            if net.fc(cand).sum().sign() != sign:
                flipped = cand
                break
    assert flipped is not None
    assert not gort.check_parity(graph, path, inputs=(flipped,))["ok"]
    # probe inputs (the example negated, random ones of other spreads) find it on their own
    probes = probe_inputs(graph.example_inputs)
    assert len(probes) >= 3
    parity = gort.check_parity(graph, path, batches=probes)
    assert not parity["ok"] and parity["inputs_checked"] == len(probes)
    assert parity["worst_input"] > 0  # the example batch itself agrees


# -- sessions, parity, benchmarks ---------------------------------------------------------------
def test_session_options_and_optimized_model(small, tmp_path):
    _, path = small
    opt_path = tmp_path / "opt" / "small.opt.onnx"
    sess = gort.session(path, threads=2, optimized_model_path=opt_path)
    opts = sess.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert sess.get_providers() == ["CPUExecutionProvider"]
    onnx.checker.check_model(onnx.load(str(opt_path)))
    assert sorted(p.name for p in opt_path.parent.iterdir()) == ["small.opt.onnx"]
    (a,) = gort.run(sess, torch.randn(1, 3, 16, 16).numpy().astype(np.float64))
    assert a.shape == (1, 10) and a.dtype == np.float32


def test_run_and_session_errors(small, tmp_path):
    _, path = small
    with pytest.raises(graphopt.BackendError, match="takes 1 input"):
        gort.run(path, torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16))
    with pytest.raises(graphopt.BackendError, match="no ONNX file"):
        gort.session(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(graphopt.BackendError, match="cannot load"):
        gort.session(bad)


def test_check_parity_exact_then_perturbed(small):
    graph, path = small
    report = gort.check_parity(graph, path)
    assert report["ok"] is True
    assert report["rel"] <= 1e-4 and report["cosine"] > 0.999999 and report["top1"] == 1.0
    assert set(report) >= {"max_abs", "rel", "cosine", "top1", "ok"}
    report = gort.check_parity(graph, path, inputs=torch.randn(4, 3, 16, 16))
    assert report["ok"] is True

    changed = graph.copy()  # the fixture's graph stays intact
    with torch.no_grad():
        changed.module.get_submodule("conv2").weight[0].mul_(1.5)
    report = gort.check_parity(changed, path)
    assert report["ok"] is False and report["rel"] > 1e-3


def test_benchmark_reports_sane_statistics(small):
    _, path = small
    r = gort.benchmark(path, threads=1, warmup=1, runs=7)
    assert {"median_ms", "mean_ms", "p10_ms", "p90_ms", "stdev_ms", "runs", "threads"} <= set(r)
    assert r["runs"] == 7 and r["threads"] == 1 and r["batch"] == 1
    assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["stdev_ms"] >= 0
    r = gort.benchmark(path, inputs=torch.randn(4, 3, 16, 16), warmup=0, runs=2, min_seconds=0.05)
    assert r["runs"] >= 2 and r["batch"] == 4


def test_torch_benchmark_restores_threads(small):
    graph, _ = small
    before = torch.get_num_threads()
    r = gort.torch_benchmark(graph.module, torch.randn(1, 3, 16, 16), threads=1, warmup=1, runs=5)
    assert torch.get_num_threads() == before
    assert r["runs"] == 5 and r["threads"] == 1 and r["median_ms"] > 0
    assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]


def test_ort_transformer_fusions_keep_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=99, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    graph = graphopt.trace(model, {"input_ids": torch.randint(0, 99, (1, 16))})
    path = gort.export(graph, tmp_path / "bert.onnx")
    fused = gort.fuse_transformer(path, tmp_path / "fused.onnx", num_heads=4, hidden_size=32)
    assert fused.get("SkipLayerNormalization", 0) >= 2  # its patterns match graphopt's export
    kinds = {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    assert "SkipLayerNormalization" in kinds
    assert gort.check_parity(graph, tmp_path / "fused.onnx", rtol=1e-4)["ok"]
    with pytest.raises(graphopt.BackendError, match="transformer optimizer failed"):
        gort.fuse_transformer(tmp_path / "missing.onnx", tmp_path / "x.onnx", 4, 32)


def test_ort_quantize_static_writes_a_qdq_model_atomically(small, tmp_path):
    graph, src = small
    x = torch.randn(2, 3, 16, 16)
    samples = [torch.randn_like(x) for _ in range(4)]
    dst = gort.ort_quantize_static(src, tmp_path / "q.onnx", samples, method="percentile")
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert [p.name for p in tmp_path.iterdir()] == ["q.onnx"]  # no temporary files left
    (y,) = gort.run(dst, x)
    (want,) = gort.run(src, x)
    assert np.corrcoef(y.ravel(), want.ravel())[0, 1] > 0.9
    with pytest.raises(gort.BackendError, match="method must be one of"):
        gort.ort_quantize_static(src, tmp_path / "bad.onnx", samples, method="median")
    assert not (tmp_path / "bad.onnx").exists()
