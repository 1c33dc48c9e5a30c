"""graphopt.cpu: which int8 target a CPU gets, and that qdq's choice makes ORT's fused int8
kernels compute exactly what the operator definitions say, on the CPU the test runs on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from graphopt.backends.onnxruntime import export, session
from graphopt.cpu import CpuInt8, cpu_int8, resolve_target, weight_qmax


def _cpu(machine: str, *flags: str) -> CpuInt8:
    return CpuInt8(machine, "test cpu", frozenset(flags))


@pytest.mark.parametrize(
    ("cpu", "target"),
    [
        (_cpu("x86_64", "avx2", "avx512f", "avx512_vnni"), "vnni"),
        (_cpu("x86_64", "avx2", "avx_vnni"), "vnni"),
        (_cpu("x86_64", "avx2", "avx512f", "avx512bw"), "avx2"),
        (_cpu("x86_64", "avx2"), "avx2"),
        (_cpu("x86_64"), "avx2"),  # flags unreadable: the safe choice
        (_cpu("AMD64", "avx2"), "avx2"),
        (_cpu("aarch64", "asimd", "asimddp"), "arm"),
        (_cpu("arm64"), "arm"),
    ],
)
def test_target_from_features(cpu, target):
    assert cpu.target == target


def test_weight_range_per_target():
    assert weight_qmax("vnni") == 127 and weight_qmax("arm") == 127
    assert weight_qmax("avx2") == 63  # 255 * 63 * 2 = 32130 < 32767: no int16 saturation
    assert resolve_target("auto") == cpu_int8().target
    with pytest.raises(ValueError, match="unknown int8 target"):
        resolve_target("sse")


def test_qdq_option_rejects_unknown_target():
    with pytest.raises(graphopt.OptionError, match="target"):
        graphopt.Pipeline.parse("qdq(target=sse)")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


@pytest.mark.parametrize("target", ["auto", "avx2"])
def test_fused_ort_equals_operator_definitions(target, tmp_path):
    """Large weights and large positive inputs: the pairs a saturating kernel gets wrong. With
    the target this CPU needs (or 7-bit weights, exact everywhere), ORT's fused kernels give
    the operator definitions' result bit for bit."""
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        net.conv.weight.copy_(torch.sign(net.conv.weight) * 0.5)
    data = [torch.rand(16, 8, 6, 6) * 4 for _ in range(4)]
    g = graphopt.trace(net, (data[0][:1],))
    result = graphopt.Pipeline.parse(f"qdq(target={target})").run(g, data=data)
    q = result.reports[-1].details["target"]
    assert q["target"] == (cpu_int8().target if target == "auto" else target)
    assert q["weight_range"] == [-weight_qmax(q["target"]), weight_qmax(q["target"])]
    for m in result.graph.module.modules():
        if hasattr(m, "weight_int8"):
            assert int(m.weight_int8.abs().max()) <= weight_qmax(q["target"])
    path = export(result.graph, tmp_path / "q.onnx", dynamic_batch=False)
    x = (torch.rand(1, 8, 6, 6) * 4).numpy()
    fused = session(path).run(None, {"input": x})[0]
    spec = session(path, reference=True).run(None, {"input": x})[0]
    sim = result.graph.module(torch.from_numpy(x)).detach().numpy()
    assert np.abs(fused - spec).max() <= 1e-4 * np.abs(spec).max()
    assert np.abs(sim - spec).max() <= 1e-4 * np.abs(spec).max()
