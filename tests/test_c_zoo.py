"""torchvision families beyond the parity models compile and match ORT (random weights,
1x3x64x64, -O1): mobilenet_v3 (HardSwish/HardSigmoid, squeeze-excite), efficientnet
(Sigmoid*Mul), regnet (grouped conv), squeezenet (Concat, ceil-mode MaxPool), shufflenet
(channel shuffle: Reshape/Transpose/Split). vgg's export at 224x224 passes the support check
(compiling its 0.5 GB of weights is left out)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import graphopt
from graphopt.backends.c import build, compile_program
from graphopt.backends.onnxruntime import export
from graphopt.zoo.models import load_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "name",
    [
        "mobilenet_v3_small",
        "efficientnet_b0",
        "regnet_x_400mf",
        "squeezenet1_0",
        "shufflenet_v2_x0_5",
    ],
)
def test_torchvision_family(name, tmp_path):
    model, (x,) = load_model(f"torchvision:{name}", input_shape=(1, 3, 64, 64))
    path = export(graphopt.trace(model, (x,)), tmp_path / "m.onnx", dynamic_batch=False)
    cm = build(path, flags=("-O1",))
    sess = ort.InferenceSession(str(path))
    ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    (got,) = cm.run(x.numpy())
    assert np.abs(got - ref).max() <= 1e-4 * (ref.max() - ref.min())
    assert cm.arena_bytes <= 1.10 * cm.arena_lower_bound_bytes


def test_vgg_support_check(tmp_path):
    model, (x,) = load_model("torchvision:vgg11")
    path = export(graphopt.trace(model, (x,)), tmp_path / "vgg.onnx", dynamic_batch=False)
    ops = {n.op for n in compile_program(path).nodes}
    assert ops <= {"Conv", "MaxPool", "Gemm", "AveragePool", "Reshape", "Flatten"}
