"""The fidelity suite's machinery (benchmarks/quant_fidelity.py) on a small audio-style net
(zero ``F.pad`` before each 1-D conv, BatchNorm after ReLU, sigmoid multi-label head), trained
for a few seconds on synthetic tones: graphopt's ``qdq`` model computes the same in ORT, in
the torch simulation and in C (within one output step), ORT's ``quantize_static`` file the
same in C as in ORT's operator definitions, and ``qdq`` stays closer to fp32 than ORT's tool."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def qf():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("quant_fidelity")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def case(qf):
    models = importlib.import_module("quant_fidelity_models")
    task = models.Task(*models.tones(1024, 0), *models.tones(128, 1), multilabel=True)
    torch.manual_seed(0)
    model = models.train(models.AudioNet((8, 16, 16)), task, epochs=3)
    with torch.no_grad():
        acc = models.accuracy(model(task.x_test), task)
    calib = list(task.x_train[:128].split(32))
    return models.Case("audio-tiny", model, task, calib, acc)


def test_tones_are_learnable(case):
    assert case.accuracy > 0.08, case.accuracy  # exact match of 8 labels; all-absent: 0.03


def test_qdq_agrees_across_engines_and_beats_ort_tool(qf, case, tmp_path):
    from graphopt.backends.c import find_compiler

    try:
        find_compiler()
        c = True
    except Exception:  # noqa: BLE001 - no C compiler: ORT and torch only
        c = False
    with torch.no_grad():
        ref = case.model(case.task.x_test).numpy()
    ours = qf.graphopt_qdq(case, qf.DEFAULT, tmp_path / "qdq.onnx")
    fp32 = qf.gort.export(qf.graphopt.trace(case.model, case.example), tmp_path / "fp32.onnx")
    ort_q = qf.ort_tool(case, fp32, tmp_path / "ort.onnx", "MinMax")
    r_ours = qf.measure(case, ours, ref, tmp_path, c)
    r_ort = qf.measure(case, ort_q, ref, tmp_path, c)
    # graphopt's own model: ORT (this CPU's fused kernels) == torch == C within one step
    assert r_ours["one_step"], r_ours
    assert float(r_ours["steps_sim"]) <= 1.001 and (not c or float(r_ours["steps_c"]) <= 1.001)
    # ORT's file: C computes what the ONNX operator definitions say (ORT, optimisations off)
    if c:
        assert float(r_ort["steps_sim_c"]) <= 1.001, r_ort
    # float logits before the sigmoid + bias correction: closer to fp32 than ORT's tool
    assert r_ours["sqnr_ort"] >= r_ort["sqnr_ort"], (r_ours, r_ort)
    assert r_ours["agree_ort"] >= r_ort["agree_ort"], (r_ours, r_ort)
    rows = qf.rows_for(case, [r_ours, r_ort])
    assert len(rows) == 2 and all(len(r) == len(qf.HEAD) for r in rows)


def test_output_step_reads_the_output_scale(qf, case, tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.array([[2, -1], [1, 1]], np.int8), "w")
    ws = numpy_helper.from_array(np.array([0.5, 0.25], np.float32), "ws")
    wz = numpy_helper.from_array(np.zeros(2, np.int8), "wz")
    xs = numpy_helper.from_array(np.array(0.1, np.float32), "xs")
    xz = numpy_helper.from_array(np.array(0, np.uint8), "xz")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Gemm", ["xd", "wd"], ["y"], transB=1),
        helper.make_node("Sigmoid", ["y"], ["out"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 2])],
        [w, ws, wz, xs, xz],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g), str(path))
    # rows: |2|*0.5 + |-1|*0.5 = 1.5, 0.25 + 0.25 = 0.5 -> 0.1 * 1.5, through a sigmoid / 4
    assert qf.output_step(path) == pytest.approx(0.1 * 1.5 * 0.25)
