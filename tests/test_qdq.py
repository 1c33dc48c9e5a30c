"""The ``qdq`` pass with a ground truth: a hand-computed integer layer, torch vs ONNX Runtime
within one quantization step, integer kernels in ORT's optimised graph, digits accuracy, the
report, options, bad input and QAT."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt.backends import onnxruntime as gort
from graphopt.cpu import weight_qmax
from graphopt.errors import DataError, PassFailure
from graphopt.manager import Pipeline
from graphopt.passes.qdq import QDQ, QDQOptions
from graphopt.quant.modules import DQ_OPS, Q_OPS, FakeQuant, QATConv, QuantConv, QuantLinear
from graphopt.registry import Registry

FLOAT_COMPUTE = {"Conv", "Gemm", "MatMul", "Add", "Concat", "AveragePool", "MaxPool", "Mul"}
INTEGER_COMPUTE = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm"}


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry()
    reg.add(QDQ)
    return reg


def quantize(model_or_graph, data, text: str, registry: Registry, example=None):
    pipe = Pipeline.parse(text, registry=registry)
    if isinstance(model_or_graph, graphopt.Graph):
        return pipe.run(model_or_graph.copy(), data=data)
    example = example if example is not None else (data[0][:1],)
    return graphopt.compress(model_or_graph, pipe, example_inputs=example, data=data)


def ort_ops(path, tmp_path) -> collections.Counter:
    """Op types in ORT's optimised graph (written with optimized_model_filepath)."""
    opt = tmp_path / "optimized.onnx"
    gort.session(path, optimized_model_path=opt)
    return collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


class Tiny(nn.Module):
    """Every placement pattern: conv+ReLU, max-pool, conv+ReLU6, residual add+ReLU, depthwise
    conv, concat, avg-pool, flatten, linear+ReLU, linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.r6 = nn.ReLU6()
        self.c3 = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.avg = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.c1(x)))
        x = torch.relu(x + self.c3(self.r6(self.c2(x))))
        x = torch.cat([x, self.dw(x)], 1)
        x = torch.flatten(self.avg(x), 1)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


@pytest.fixture(scope="module")
def tiny_data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(4)]


@pytest.fixture(scope="module")
def tiny_int8(registry, tiny_data):
    torch.manual_seed(0)
    return quantize(Tiny().eval(), tiny_data, "qdq", registry)


def _q_args(node: fx.Node):
    scale, zp = node.args[1], node.args[2]
    return float(scale), int(zp)


def _output_dq(gm: fx.GraphModule) -> fx.Node:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    dq = out.args[0]
    assert dq.op == "call_function" and dq.target in DQ_OPS
    return dq


# -- ground truth ---------------------------------------------------------------------------------
def _linear(relu: bool) -> nn.Module:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -0.25]]))
        layer.bias.copy_(torch.tensor([0.3]))
    return (nn.Sequential(layer, nn.ReLU()) if relu else nn.Sequential(layer)).eval()


def test_hand_computed_linear_layer_gives_the_exact_integer(registry, tmp_path):
    """x in [0, 2.55] -> s_x = 0.01, z_x = 0; W = [1, -0.25] -> s_w = 1/127, W_q = [127, -32];
    b = 0.3 -> b_q = round(0.3 / (s_x s_w)) = 3810; calibrated y in [0, 2.2125] ->
    s_y = 2.2125/255, z_y = 0. For x = [1, 2]: x_q = [100, 200], the int32 accumulator is
    100*127 - 200*32 + 3810 = 10110 and y_q = round(10110 s_x s_w / s_y) = round(91.75) = 92."""
    calib = [torch.tensor([[0.0, 0.0], [2.55, 2.55]])]
    x = torch.tensor([[1.0, 2.0]])
    # target=vnni: full-range weights; 100*127 - 200*32 cannot saturate ORT's int16 pairs
    result = quantize(
        _linear(relu=True), calib, "qdq(target=vnni,bias-correction=false)", registry, example=(x,)
    )
    gm = result.graph.module
    layer = gm.get_submodule("0")
    assert isinstance(layer, QuantLinear)
    assert layer.weight_int8.tolist() == [[127, -32]]
    assert layer.bias_int32.tolist() == [3810]
    assert layer.weight_scale.item() == pytest.approx(1 / 127, rel=1e-6)
    q_in = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in Q_OPS)
    assert _q_args(q_in) == (pytest.approx(0.01, rel=1e-6), 0)
    dq_out = _output_dq(gm)
    s_y, z_y = _q_args(dq_out)
    assert s_y == pytest.approx(2.2125 / 255, rel=1e-6) and z_y == 0

    values = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            values[n] = v = super().run_node(n)
            return v

    Rec(gm).run(x)
    assert values[dq_out.args[0]].dtype == torch.uint8
    assert values[dq_out.args[0]].tolist() == [[92]]
    assert values[dq_out].item() == pytest.approx(92 * s_y, rel=1e-6)

    path = gort.export(result.graph, tmp_path / "linear.onnx")
    got = gort.run(path, x)[0]
    assert round(float(got[0, 0]) / s_y) + z_y == 92
    assert ort_ops(path, tmp_path)["QGemm"] == 1

    # without the ReLU the linear is the model output and stays float: y = s_x s_w acc
    result = quantize(
        _linear(relu=False), calib, "qdq(target=vnni,bias-correction=false)", registry, example=(x,)
    )
    s_acc = 0.01 / 127
    assert float(result.graph.module(x)) / s_acc == pytest.approx(10110, abs=0.01)
    path = gort.export(result.graph, tmp_path / "linear_float_out.onnx")
    assert float(gort.run(path, x)[0][0, 0]) / s_acc == pytest.approx(10110, abs=0.01)
    ops = ort_ops(path, tmp_path)
    assert ops["QGemm"] == 1 and "DequantizeLinear" not in ops, ops


def test_per_channel_weight_scales_reproduce_the_weights(tiny_int8):
    torch.manual_seed(0)
    original = Tiny().eval()
    for name in ("c1", "c2", "c3", "dw"):
        q = tiny_int8.graph.module.get_submodule(name)
        assert isinstance(q, QuantConv) and q.per_channel
        w = getattr(original, name).weight.detach()
        s = q.weight_scale
        assert s.shape == (w.shape[0],)
        qmax = weight_qmax("auto")  # 127, or 63 on x86 without VNNI (graphopt.cpu)
        assert torch.allclose(s, w.abs().flatten(1).amax(1) / qmax, rtol=1e-6)
        assert int(q.weight_int8.abs().max()) == qmax
        err = (w - q.weight_int8.float() * s[:, None, None, None]).abs().flatten(1).amax(1)
        assert torch.all(err <= s / 2 * (1 + 1e-5)), name


class TinyReLUOut(Tiny):
    """Tiny with a quantized output (fc2 + ReLU is a unit)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_torch_and_ort_agree_within_one_step(registry, tiny_data, tmp_path):
    torch.manual_seed(0)
    result = quantize(TinyReLUOut().eval(), tiny_data, "qdq", registry)
    path = gort.export(result.graph, tmp_path / "tiny_q.onnx")
    x = torch.randn(512, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = result.graph.module(x).numpy()
    got = gort.run(path, x)[0]
    step, _ = _q_args(_output_dq(result.graph.module))
    assert np.abs(got - want).max() <= step * (1 + 1e-4)
    # exact integers almost everywhere: rounding differs only on float32 ties
    assert (np.abs(got - want) > step / 2).mean() < 0.01


def test_float_logits_agree_with_ort(tiny_int8, tmp_path):
    """fc2 writes float logits: a one-step difference in its int8 input moves them by at most
    s_in * max_n sum_k |W[n, k]|."""
    path = gort.export(tiny_int8.graph, tmp_path / "tiny.onnx")
    x = torch.randn(512, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny_int8.graph.module(x).numpy()
    got = gort.run(path, x)[0]
    fc2 = tiny_int8.graph.module.get_submodule("fc2")
    w = fc2.weight_int8.float() * fc2.weight_scale[:, None]
    bound = fc2.in_scale * float(w.abs().sum(1).max())
    assert np.abs(got - want).max() <= bound
    assert np.abs(got - want).mean() < 1e-3 * np.abs(want).mean()


def test_ort_runs_every_pattern_as_integer_kernels(tiny_int8, tmp_path):
    path = gort.export(tiny_int8.graph, tmp_path / "tiny.onnx")
    ops = ort_ops(path, tmp_path)
    assert not FLOAT_COMPUTE & set(ops), ops
    assert ops["QLinearConv"] == 4 and ops["QGemm"] == 2, ops
    for op in ("QLinearAdd", "QLinearConcat", "QLinearAveragePool"):
        assert ops[op] == 1, ops
    assert ops["QuantizeLinear"] == 1 and "DequantizeLinear" not in ops, ops  # float logits
    assert "Relu" not in ops and "Clip" not in ops


@pytest.fixture(scope="module")
def digits():
    from graphopt.zoo.digits import load_digits_data
    from graphopt.zoo.models import load_model

    model, example = load_model("digits:vgg")
    return model, example, load_digits_data()


def test_digits_int8_in_ort_is_integer_and_within_half_a_point(digits, registry, tmp_path):
    from graphopt.zoo.digits import evaluate

    model, example, data = digits
    calib = data.batches("train", 64)
    fp32 = graphopt.compress(model, "fold-bn", example_inputs=example)
    int8 = quantize(fp32.graph, calib, "qdq", registry)
    f_path = gort.export(fp32.graph, tmp_path / "fp32.onnx")
    q_path = gort.export(int8.graph, tmp_path / "int8.onnx")
    ops = ort_ops(q_path, tmp_path)
    assert ops["QLinearConv"] == 4 and ops["QGemm"] == 2, ops
    assert not {"Conv", "Gemm", "MatMul"} & set(ops), ops
    test = data.batches("test", 512)
    f_sess, q_sess = gort.session(f_path), gort.session(q_path)
    top1_fp32 = evaluate(lambda x: gort.run(f_sess, x)[0], test)
    top1_int8 = evaluate(lambda x: gort.run(q_sess, x)[0], test)
    assert top1_fp32 > 0.95
    assert top1_int8 >= top1_fp32 - 0.005, (top1_fp32, top1_int8)


# -- report and options ---------------------------------------------------------------------------
def test_report_lists_scales_zero_points_and_sqnr(tiny_int8):
    details = tiny_int8.reports[-1].details
    layers = {row["node"]: row for row in details["layers"]}
    assert len(layers) == 9
    c1 = layers["c1"]
    assert c1["op"] == "conv+relu" and c1["module"] == "c1"
    assert c1["output"]["zero_point"] == 0 and c1["output"]["scale"] > 0
    assert c1["inputs"][0]["dtype"] == "uint8"
    assert c1["weight_scale"]["channels"] == 8
    assert all(20 < row["sqnr_db"] < 80 for row in details["layers"])
    assert layers["fc2"]["inputs"][0] == layers["fc1"]["output"]  # through the dropout
    assert details["calibration"] == {"method": "minmax", "batches": 4, "samples": 64}
    assert details["float_ops"] == []
    assert "9 ops" in details["summary"]


def test_options_parse_and_print_back(registry):
    text = (
        "qdq(weights=per-tensor,activations=int8,calibration=percentile,percentile=99.9,"
        "batches=4,skip=[fc2,c*],bias-correction=true)"
    )
    pipe = Pipeline.parse(text, registry=registry)
    opts = pipe.specs[0].options
    assert opts == QDQOptions(
        weights="per-tensor",
        activations="int8",
        calibration="percentile",
        percentile=99.9,
        batches=4,
        skip=("fc2", "c*"),
        bias_correction=True,
    )
    assert str(pipe) == text
    with pytest.raises(graphopt.OptionError, match="percentile"):
        Pipeline.parse("qdq(percentile=20)", registry=registry)
    with pytest.raises(graphopt.OptionError, match="minmax"):
        Pipeline.parse("qdq(calibration=kl)", registry=registry)


def test_skip_keeps_modules_float(registry, tiny_data, tmp_path):
    torch.manual_seed(0)
    result = quantize(Tiny().eval(), tiny_data, "qdq(skip=[fc*])", registry)
    gm = result.graph.module
    assert isinstance(gm.get_submodule("fc1"), nn.Linear)
    assert isinstance(gm.get_submodule("c1"), QuantConv)
    skipped = result.reports[-1].details["skipped"]
    assert {s["node"] for s in skipped} == {"fc1", "fc2"}
    ops = ort_ops(gort.export(result.graph, tmp_path / "skip.onnx"), tmp_path)
    assert ops["Gemm"] + ops["FusedGemm"] == 2 and ops["QLinearConv"] == 4, ops


def test_batches_limits_calibration(registry, tiny_data):
    torch.manual_seed(0)
    result = quantize(Tiny().eval(), tiny_data, "qdq(batches=2)", registry)
    assert result.reports[-1].details["calibration"]["batches"] == 2


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_histogram_methods_keep_accuracy(method, registry, tiny_data, tiny_int8):
    torch.manual_seed(0)
    result = quantize(Tiny().eval(), tiny_data, f"qdq(calibration={method})", registry)
    drift = result.reports[-1].drift_total
    assert drift["top1"] >= 0.9 and drift["cosine"] > 0.99, drift


def test_bias_correction_removes_the_mean_shift(registry, tiny_data):
    torch.manual_seed(0)
    model = Tiny().eval()
    # coarse per-tensor weights shift the mean of each output channel
    plain = quantize(model, tiny_data, "qdq(weights=per-tensor,bias-correction=false)", registry)
    fixed = quantize(model, tiny_data, "qdq(weights=per-tensor,bias-correction=true)", registry)
    x = torch.cat(tiny_data)
    with torch.no_grad():
        ref = model(x)
        shift_plain = (plain.graph.module(x) - ref).mean(0).abs().mean()
        shift_fixed = (fixed.graph.module(x) - ref).mean(0).abs().mean()
    assert shift_fixed < shift_plain
    assert fixed.reports[-1].details["bias_correction"]


# -- what stays float -------------------------------------------------------------------------------
class WithSiLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.act = nn.SiLU()
        self.b = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_float_op_between_quantized_ops_is_reported(registry, tmp_path):
    data = [torch.randn(8, 3, 10, 10)]
    result = quantize(WithSiLU().eval(), data, "qdq", registry)
    floats = result.reports[-1].details["float_ops"]
    assert [(f["node"], f["op"]) for f in floats] == [("act", "act")]
    assert "no integer kernel" in floats[0]["reason"]
    ops = ort_ops(gort.export(result.graph, tmp_path / "silu.onnx"), tmp_path)
    assert ops["QLinearConv"] == 2 and "Conv" not in ops, ops


def test_int8_activations(registry, tiny_data, tmp_path):
    torch.manual_seed(0)
    result = quantize(Tiny().eval(), tiny_data, "qdq(activations=int8)", registry)
    q = next(n for n in result.graph.module.graph.nodes if n.target in Q_OPS)
    assert q.args[5] == torch.int8
    assert result.reports[-1].drift_total["cosine"] > 0.999
    # ORT converts int8 pairs to its uint8 kernels where a value has one consumer
    ops = ort_ops(gort.export(result.graph, tmp_path / "s8.onnx"), tmp_path)
    assert ops["QLinearConv"] >= 2 and ops["QGemm"] == 2, ops


# -- bad input ------------------------------------------------------------------------------------
def test_no_data_names_what_to_pass(registry):
    graph = graphopt.trace(Tiny().eval(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(DataError, match=r"data=batches"):
        Pipeline.parse("qdq", registry=registry).run(graph)


def test_empty_data_is_an_error(registry):
    graph = graphopt.trace(Tiny().eval(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(DataError, match="no batches"):  # refused before any pass runs
        Pipeline.parse("qdq", registry=registry).run(graph, data=[])


def test_nan_in_calibration_names_the_node(registry):
    class Log(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.log(self.conv(x)).mean((2, 3)))

    graph = graphopt.trace(Log().eval(), (torch.randn(1, 3, 6, 6),))
    pipe = Pipeline.parse("qdq", registry=registry)
    # log of negative conv outputs: the manager's check of the model as given names 'log'
    with pytest.raises(DataError, match=r"before any pass ran: first at node 'log'"):
        pipe.run(graph, data=[torch.randn(4, 3, 6, 6)])
    # without it, calibration names the first quantized value to see NaN: fc's input
    with pytest.raises(PassFailure, match=r"calibration saw NaN values at node 'mean'"):
        pipe.run(graph, data=[torch.randn(4, 3, 6, 6)], verify=False)
    bad = torch.randn(4, 3, 6, 6)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match=r"verification batch holds NaN/Inf"):
        pipe.run(graph, data=[bad])
    with pytest.raises(PassFailure, match=r"inf values at node 'x'"):
        pipe.run(graph, data=[bad], verify=False)
    # the failed pass leaves no observers behind in the graph it was given
    assert not any("observer" in n.name for n in graph.nodes)


def test_constant_activation_gets_a_safe_scale(registry):
    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x) * 0.0 - 1.0).mean((2, 3)))

    result = quantize(Zero().eval(), [torch.randn(4, 3, 6, 6)], "qdq", registry)
    out = result.graph.module(torch.randn(2, 3, 6, 6))
    assert torch.isfinite(out).all()
    for row in result.reports[-1].details["layers"]:
        assert row["output"] is None or row["output"]["scale"] > 0


def test_quantizing_twice_is_an_error(registry, tiny_int8, tiny_data):
    with pytest.raises(PassFailure, match="already quantized"):
        Pipeline.parse("qdq", registry=registry).run(tiny_int8.graph.copy(), data=tiny_data)
    with pytest.raises(PassFailure, match="mode=convert"):
        Pipeline.parse("qdq(mode=convert)", registry=registry).run(
            tiny_int8.graph.copy(), data=tiny_data
        )


def test_a_graph_without_quantizable_ops_is_left_alone(registry):
    class Sig(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x) * 2

    graph = graphopt.trace(Sig(), (torch.randn(2, 3),))
    result = Pipeline.parse("qdq", registry=registry).run(graph, data=[torch.randn(4, 3)])
    assert not result.reports[0].modified
    assert result.reports[0].details["summary"] == "nothing to quantize"


# -- QAT ------------------------------------------------------------------------------------------
def test_qat_trains_through_fake_quant_and_converts(registry, tiny_data):
    torch.manual_seed(0)
    model = Tiny().eval()
    qat = quantize(model, tiny_data, "qdq(mode=qat,learn-scales=true)", registry)
    gm = qat.graph.module
    fq = [m for m in gm.modules() if isinstance(m, FakeQuant)]
    convs = [m for m in gm.modules() if isinstance(m, QATConv)]
    assert fq and len(convs) == 4
    gm.train()
    loss = gm(torch.cat(tiny_data)).pow(2).mean()
    loss.backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)
    assert all(m.log_scale.grad is not None for m in fq)  # LSQ: the scales learn too
    opt = torch.optim.SGD(gm.parameters(), lr=1e-3)
    opt.step()
    gm.eval()
    with torch.no_grad():
        before = gm(torch.cat(tiny_data))
    frozen = Pipeline.parse("qdq(mode=convert)", registry=registry).run(qat.graph, data=tiny_data)
    gm = frozen.graph.module
    assert isinstance(gm.get_submodule("c1"), QuantConv)
    assert not any(isinstance(m, FakeQuant) for m in gm.modules())
    with torch.no_grad():
        after = gm(torch.cat(tiny_data))
    # the same rounding except the int32 bias, which may move a value across a rounding
    # boundary now and then
    diff, top = (after - before).abs(), float(before.abs().max())
    assert float(diff.max()) < 0.02 * top and float(diff.mean()) < 1e-3 * top


def test_qat_without_learnable_scales_tracks_the_weights(registry, tiny_data):
    torch.manual_seed(0)
    qat = quantize(Tiny().eval(), tiny_data, "qdq(mode=qat)", registry)
    conv = qat.graph.module.get_submodule("c1")
    with torch.no_grad():
        conv.weight.mul_(2.0)
    qmax = weight_qmax("auto")
    assert torch.allclose(conv.current_weight_scale(), conv.weight.abs().flatten(1).amax(1) / qmax)


def test_per_module_overrides(registry, tiny_data):
    torch.manual_seed(0)
    model = Tiny().eval()
    text = 'qdq(override=["fc*:weights=per-tensor", "c1:calibration=percentile;percentile=99"])'
    result = quantize(model, tiny_data, text, registry)
    gm = result.graph.module
    assert not gm.get_submodule("fc1").per_channel and not gm.get_submodule("fc2").per_channel
    assert gm.get_submodule("c1").per_channel and gm.get_submodule("c2").per_channel
    plain = {r["node"]: r for r in result.reports[-1].details["layers"]}
    base = {
        r["node"]: r
        for r in quantize(model, tiny_data, "qdq", registry).reports[-1].details["layers"]
    }
    # percentile(99) clips c1's output (after its ReLU) below the min/max range
    assert plain["c1"]["output"]["scale"] < base["c1"]["output"]["scale"]
    assert plain["c2"]["output"]["scale"] == base["c2"]["output"]["scale"]
    with pytest.raises(graphopt.OptionError, match="unknown setting 'bits'"):
        Pipeline.parse('qdq(override=["c1:bits=4"])', registry=registry)
    with pytest.raises(graphopt.OptionError, match="GLOB:key=value"):
        Pipeline.parse('qdq(override=["c1"])', registry=registry)


def test_qat_then_distill_then_convert_on_digits(digits, registry):
    from graphopt.zoo.digits import evaluate

    model, example, data = digits
    train, test = data.batches("train", 64), data.batches("test", 512)
    result = graphopt.compress(
        model,
        Pipeline.parse(
            # 8-bit weights (target=vnni): two epochs of LSQ with the 7-bit weights of
            # target=avx2 lose ~1.7 points here; this checks that QAT recovers float accuracy.
            # QAT fine-tunes a trained model, so with a fine-tuning lr: at distill's default
            # 0.01 the result after two epochs depended on the CPU (0.98 on an AMD EPYC,
            # 0.95 on a Xeon with AVX-512), at 0.001 it is 0.9917 = float on the Xeon
            "fold-bn,qdq(mode=qat,learn-scales=true,target=vnni),distill(epochs=2,lr=0.001),"
            "qdq(mode=convert)",
            registry=registry,
        ),
        example_inputs=example,
        data=train,
    )
    gm = result.graph.module
    assert isinstance(gm.get_submodule("features.0"), QuantConv)
    assert evaluate(gm, test) >= evaluate(model, test) - 0.01


def test_conv_without_bias_and_a_json_report(registry, tmp_path):
    import json

    class NoBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, bias=False)
            self.b = nn.Conv2d(8, 4, 1, bias=False)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    data = [torch.randn(8, 3, 6, 6)]
    result = quantize(NoBias().eval(), data, "qdq(bias-correction=false)", registry)
    assert result.graph.module.get_submodule("a").bias_int32 is None
    json.dumps(result.reports[-1].details, allow_nan=False)
    ops = ort_ops(gort.export(result.graph, tmp_path / "nobias.onnx"), tmp_path)
    assert ops["QLinearConv"] == 2 and "Conv" not in ops, ops


def test_inconsistent_options_are_refused(registry):
    with pytest.raises(graphopt.OptionError, match="needs mode=qat"):
        Pipeline.parse("qdq(learn-scales=true)", registry=registry)
    with pytest.raises(graphopt.OptionError, match="use mode=ptq"):
        Pipeline.parse("qdq(activations=dynamic,mode=qat)", registry=registry)
