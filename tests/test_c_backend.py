"""The C backend's contract: files, header, report, errors, CLI entry, planner invariants."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.c import UnsupportedError, build, emit
from graphopt.backends.c.build import STRICT, find_compiler
from graphopt.errors import BackendError


def _small_model(batch="N") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32), "fw"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1, name="fc"),
        helper.make_node("Softmax", ["y"], ["prob"], axis=1),
    ]
    g = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_emit_writes_files_and_report(tmp_path):
    report = emit(_small_model(), tmp_path, name="net")
    for f in ("net.h", "net.c", "net_weights.c", "report.json"):
        assert (tmp_path / f).exists(), f
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["arena_bytes"] == report["arena_bytes"]
    assert report["op_counts"] == {
        "Conv": 1,
        "Flatten": 1,
        "Gemm": 1,
        "MaxPool": 1,
        "Softmax": 1,
    }
    assert report["fused_activations"] == {"Relu": 1}
    assert report["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 3, 8, 8]}]
    assert report["weight_bytes"] >= 4 * (4 * 27 + 4 + 640 + 10)  # conv weights are packed
    assert report["arena_lower_bound_bytes"] <= report["arena_bytes"]
    h = (tmp_path / "net.h").read_text()
    assert "#define NET_ARENA_BYTES" in h
    assert "int net_run(const void *const inputs[], void *const outputs[], void *arena);" in h
    assert "int net_run_float(const float *input, float *output, void *arena);" in h
    assert "NET_INPUT0_SHAPE {1, 3, 8, 8}" in h
    src = (tmp_path / "net.c").read_text()
    assert "malloc(" not in src
    # no mutable file-scope data: re-entrant (static functions and const tables only)
    mutable = re.compile(
        r"^(?!(static |extern )?const )(static |extern )?[A-Za-z_]\w*( \w+)*\s*\**\s*\w+"
        r"\s*(\[[^\]]*\])?\s*(=[^=]|;)"
    )
    assert not [line for line in src.splitlines() if mutable.match(line)]


def test_strict_c99_compile_and_parity(tmp_path):
    """-std=c99 -O2 -Wall -Wextra -Werror -pedantic, a C main through the float wrapper."""
    model = _small_model()
    emit(model, tmp_path, name="net")
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    (tmp_path / "main.c").write_text(
        """#include <stdio.h>
#include "net.h"
static float arena[(NET_ARENA_BYTES + sizeof(float) - 1) / sizeof(float) + 4];
int main(void) {
  float x[NET_INPUT0_SIZE], y[NET_OUTPUT0_SIZE];
  int i;
  FILE *f = fopen("x.bin", "rb");
  if (!f || fread(x, sizeof(float), NET_INPUT0_SIZE, f) != NET_INPUT0_SIZE) return 3;
  fclose(f);
  if (net_run_float(x, y, arena) != NET_OK) return 4;
  for (i = 0; i < NET_OUTPUT0_SIZE; ++i) printf("%.9g\\n", y[i]);
  return 0;
}
"""
    )
    cc = find_compiler()
    exe = tmp_path / "net"
    subprocess.run(
        [cc, *STRICT, "-O2", "-o", str(exe), "main.c", "net.c", "net_weights.c", "-lm"],
        cwd=tmp_path,
        check=True,
    )
    out = subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, text=True, check=True)
    y = np.array([float(v) for v in out.stdout.split()], np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].reshape(-1)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_build_runs_and_reports_sizes():
    model = _small_model()
    cm = build(model)
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (y,) = cm.run(x)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert cm.weight_bytes > 0 and cm.arena_bytes >= cm.arena_lower_bound_bytes > 0


def test_unsupported_ops_listed_before_writing(tmp_path):
    nodes = [
        helper.make_node("Hardmax", ["x"], ["a"], name="hm1"),
        helper.make_node("Hardmax", ["a"], ["b"], name="hm2"),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("LpNormalization", ["c"], ["y"], name="lpn"),
        helper.make_node("MaxPool", ["x"], ["p", "idx"], kernel_shape=[2], name="mp"),
    ]
    g = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("idx", TensorProto.INT64, None),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError) as e:
        emit(model, out)
    msg = str(e.value)
    assert "Hardmax (hm1, hm2)" in msg and "LpNormalization (lpn)" in msg
    assert "MaxPool node 'mp'" in msg and "Indices" in msg
    assert isinstance(e.value, BackendError)
    assert not out.exists()


def test_symbolic_dims():
    m = _small_model(batch="batch")
    g = m.graph
    g.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    with pytest.raises(BackendError, match="symbolic dimension 2"):
        build(m)


def test_missing_compiler():
    with pytest.raises(BackendError, match="no C compiler found"):
        build(_small_model(), cc="/nonexistent/cc-does-not-exist")
