"""Whole models through the C backend against ONNX Runtime: digits:vgg (trained), torchvision
resnet18 and mobilenet_v2 (random weights, 1x3x64x64). Float parity: max |C - ORT| <= 1e-4 of
the output range. Arena: at most 1.10x the lower bound. Plus an AddressSanitizer +
UndefinedBehaviorSanitizer build of digits:vgg with an arena of exactly ARENA_BYTES."""

from __future__ import annotations

import subprocess

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt.backends.c import build, emit
from graphopt.backends.c.build import STRICT, find_compiler
from graphopt.backends.onnxruntime import export
from graphopt.zoo.models import load_model

MODELS = {
    "digits:vgg": None,
    "torchvision:resnet18": (1, 3, 64, 64),
    "torchvision:mobilenet_v2": (1, 3, 64, 64),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """spec -> (onnx path, example input)"""
    root = tmp_path_factory.mktemp("c_models")
    out = {}
    for spec, shape in MODELS.items():
        torch.manual_seed(0)
        model, (x,) = load_model(spec, input_shape=shape)
        path = root / (spec.split(":")[1] + ".onnx")
        export(graphopt.trace(model, (x,)), path)
        out[spec] = (path, x.numpy())
    return out


def _ort(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("spec", list(MODELS))
def test_float_parity_and_arena(exported, spec):
    path, x = exported[spec]
    cm = build(path)
    ref = _ort(path, x)
    (got,) = cm.run(x)
    span = float(ref.max() - ref.min())
    err = float(np.abs(got - ref).max())
    ratio = cm.arena_bytes / cm.arena_lower_bound_bytes
    print(
        f"{spec}: max|C-ORT| / range = {err / span:.2e}; arena {cm.arena_bytes} B, lower "
        f"bound {cm.arena_lower_bound_bytes} B ({ratio:.3f}x); weights {cm.weight_bytes} B"
    )
    assert err <= 1e-4 * span
    assert ratio <= 1.10
    rng = np.random.default_rng(1)
    x2 = rng.standard_normal(x.shape).astype(np.float32)  # a second input, same library
    np.testing.assert_allclose(cm.run(x2)[0], _ort(path, x2), rtol=0, atol=1e-4 * span)


def _sanitizer_works(cc: str, tmp_path) -> bool:
    src = tmp_path / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    r = subprocess.run(
        [cc, "-fsanitize=address,undefined", str(src), "-o", str(tmp_path / "probe")],
        capture_output=True,
    )
    return r.returncode == 0 and subprocess.run([str(tmp_path / "probe")]).returncode == 0


MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include "net.h"
int main(void) {
  float *x = malloc(sizeof(float) * NET_INPUT0_SIZE);
  float *y = malloc(sizeof(float) * NET_OUTPUT0_SIZE);
  void *arena = malloc(NET_ARENA_BYTES);  /* exactly the planned size: overruns are caught */
  FILE *f = fopen("x.bin", "rb");
  int i, rc;
  if (!x || !y || !arena || !f) return 3;
  if (fread(x, sizeof(float), NET_INPUT0_SIZE, f) != NET_INPUT0_SIZE) return 4;
  fclose(f);
  rc = net_run_float(x, y, arena);
  for (i = 0; i < NET_OUTPUT0_SIZE; ++i) printf("%.9g\n", y[i]);
  free(x); free(y); free(arena);
  return rc;
}
"""


def run_sanitized(cc: str, out_dir, x) -> np.ndarray:
    """Compile ``net.c`` (emitted into ``out_dir`` with ``name="net"``) and :data:`MAIN` with
    AddressSanitizer and UBSan, run it on ``x`` (the arena is exactly the planned size, so an
    overrun is caught) and return its output; asserts that the run is clean."""
    (out_dir / "main.c").write_text(MAIN)
    (out_dir / "x.bin").write_bytes(np.asarray(x, np.float32).tobytes())
    flags = [
        "-O1",
        "-g",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
    ]
    subprocess.run(
        [cc, *STRICT, *flags, "-o", "net", "main.c", "net.c", "net_weights.c", "-lm"],
        cwd=out_dir,
        check=True,
    )
    r = subprocess.run(
        ["./net"],
        cwd=out_dir,
        capture_output=True,
        text=True,
        env={"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr
    return np.array([float(v) for v in r.stdout.split()], np.float32)


def test_asan_ubsan_clean(exported, tmp_path):
    cc = find_compiler()
    if not _sanitizer_works(cc, tmp_path):
        pytest.skip("the compiler's AddressSanitizer/UBSan runtime is not available")
    path, x = exported["digits:vgg"]
    emit(path, tmp_path, name="net")
    got = run_sanitized(cc, tmp_path, x)
    ref = _ort(path, x).reshape(-1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
