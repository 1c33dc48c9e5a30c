"""int8 PTQ side by side: graphopt ``qdq`` vs ONNX Runtime's ``quantize_static`` (QDQ,
per-channel) vs torch.ao FX and torchao PT2E (when they import).

    python benchmarks/quantize.py [--models resnet18,mobilenet_v2] [--rounds 5] [--runs 30]

Accuracy: ``digits:vgg`` top-1 on the 360-image test split; graphopt and ORT models run in ORT,
torch.ao FX in PyTorch (x86 / fbgemm kernels), PT2E in ORT after the same ONNX export when it
exports, else in PyTorch. Every tool calibrates on the same batches (the first
``--calib-batches`` batches of 64 training images).

Speed: torchvision models (``weights=None``, 1x3x224x224), ``fold-bn`` first, fp32 and int8
exported by graphopt; ORT's tool quantizes that same fp32 ONNX file (``quant_pre_process``
first, U8S8 as its docs recommend for VNNI CPUs: ``activation_type=QUInt8``,
``weight_type=QInt8``, MinMax). Calibration: ``--calib-batches`` random-normal images, the same
for both. ORT single thread, batch 1; the files are timed in interleaved rounds (``--rounds``
rounds of ``--runs`` runs after warm-up, the order rotating) and the table gives the median of
the round medians, and the speed-up from the fastest round of each (less sensitive to other
processes sharing the machine).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import graphopt
from graphopt.backends import onnxruntime as gort
from graphopt.manager import Pipeline
from graphopt.registry import REGISTRY, Registry
from graphopt.table import render
from graphopt.zoo.models import load_model

FLOAT_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "Add", "Concat"}
INT_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearConcat", "MatMulInteger"}


def registry() -> Registry:
    """The registry with ``qdq`` (added here in case it is not a built-in yet)."""
    if "qdq" in REGISTRY.names():
        return REGISTRY
    from graphopt.passes.qdq import QDQ

    reg = Registry()
    reg.add(QDQ)
    return reg


def ort_ops(path: Path) -> collections.Counter:
    opt = path.with_suffix(".opt.onnx")
    gort.session(path, optimized_model_path=opt)
    return collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


def op_summary(ops: collections.Counter) -> str:
    ints = sum(v for k, v in ops.items() if k in INT_OPS)
    floats = sum(v for k, v in ops.items() if k in FLOAT_OPS)
    return f"{ints} int / {floats} float"


class _Reader:
    """ORT CalibrationDataReader over a list of input arrays."""

    def __init__(self, name: str, arrays: list[np.ndarray]):
        self.name, self.arrays, self.i = name, arrays, 0

    def get_next(self):
        if self.i >= len(self.arrays):
            return None
        self.i += 1
        return {self.name: self.arrays[self.i - 1]}

    def rewind(self):
        self.i = 0


def ort_quantize(fp32: Path, out: Path, calib: list[torch.Tensor], method: str = "MinMax") -> Path:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre))
    except Exception as e:  # pragma: no cover - depends on the ORT version
        logging.warning("quant_pre_process failed (%s); quantizing the export as is", e)
        pre = fp32
    name = onnx.load(str(pre)).graph.input[0].name
    reader = _Reader(name, [x.numpy() for x in calib])
    quantize_static(
        str(pre),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    return out


def latency(paths: dict[str, Path], rounds: int, runs: int) -> dict[str, tuple[float, float]]:
    """``(median, min)`` over rounds of each file's median latency (ms). The sessions stay open
    and the order rotates every round, so load from other processes hits all files alike."""
    sessions = {k: gort.session(p, threads=1) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    keys = list(paths)
    for k in keys:  # warm-up
        for _ in range(5):
            sessions[k].run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t = []
            for _ in range(runs):
                t0 = time.perf_counter()
                sessions[k].run(None, feeds[k])
                t.append(time.perf_counter() - t0)
            times[k].append(statistics.median(t) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


# -- accuracy on digits ---------------------------------------------------------------------------
class _Scorer:
    """Top-1 on the test split and the SQNR (dB) of the logits against the fp32 model's."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.ref = x, y, None

    def __call__(self, predict) -> tuple[str, str]:
        with torch.no_grad():
            logits = torch.as_tensor(np.asarray(predict(self.x))).float()
        if self.ref is None:
            self.ref = logits
        top1 = float((logits.argmax(1) == self.y).double().mean())
        noise = float((logits - self.ref).pow(2).sum())
        sqnr = (
            "exact" if noise == 0 else f"{10 * np.log10(float(self.ref.pow(2).sum()) / noise):.1f}"
        )
        return f"{top1:.4f}", sqnr


def _ort(path: Path):
    sess = gort.session(path)
    return lambda x: gort.run(sess, x)[0]


def digits_accuracy(d: Path, calib_batches: int) -> list[list[str]]:
    from graphopt.zoo.digits import load_digits_data

    reg = registry()
    model, example = load_model("digits:vgg")
    data = load_digits_data()
    calib = data.batches("train", 64)[:calib_batches]
    calib_x = [x for x, _ in calib]
    score = _Scorer(data.x_test, data.y_test)
    rows = []

    fp32 = graphopt.compress(model, "fold-bn", example_inputs=example)
    f_path = gort.export(fp32.graph, d / "digits_fp32.onnx")
    rows.append(["fp32", "ORT", *score(_ort(f_path)), "-", "-"])
    for opts in (
        "",
        "(calibration=percentile)",
        "(calibration=mse)",
        "(calibration=entropy)",
        "(bias-correction=true)",
        "(calibration=mse,bias-correction=true)",
        "(weights=per-tensor)",
        "(weights=per-tensor,equalize=true)",
    ):
        t0 = time.perf_counter()
        q = Pipeline.parse(f"qdq{opts}", registry=reg).run(fp32.graph.copy(), data=calib)
        secs = time.perf_counter() - t0
        path = gort.export(q.graph, d / "digits_qdq.onnx")
        rows.append(
            [
                f"graphopt qdq{opts}",
                "ORT",
                *score(_ort(path)),
                op_summary(ort_ops(path)),
                f"{secs:.1f}",
            ]
        )
    for method in ("MinMax", "Percentile", "Entropy"):
        t0 = time.perf_counter()
        try:
            path = ort_quantize(f_path, d / f"digits_ort_{method}.onnx", calib_x, method)
        except Exception as e:
            rows.append([f"ORT quantize_static ({method})", "ORT", f"failed: {e}", "-", "-", "-"])
            continue
        secs = time.perf_counter() - t0
        rows.append(
            [
                f"ORT quantize_static ({method})",
                "ORT",
                *score(_ort(path)),
                op_summary(ort_ops(path)),
                f"{secs:.1f}",
            ]
        )
    rows.extend(_torch_fx(model, example, calib_x, score))
    rows.extend(_pt2e(model, example, calib_x, score, d))
    return rows


def _torch_fx(model, example, calib_x, score) -> list[list[str]]:
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as e:
        return [["torch.ao FX", "-", f"not available: {e}", "-", "-", "-"]]
    t0 = time.perf_counter()
    with warnings_off():
        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(
            graphopt.trace(model, example).module, get_default_qconfig_mapping("x86"), example
        )
        with torch.no_grad():
            for x in calib_x:
                prepared(x)
        converted = convert_fx(prepared)
    secs = time.perf_counter() - t0
    return [["torch.ao FX (x86)", "PyTorch", *score(converted), "-", f"{secs:.1f}"]]


def _pt2e(model, example, calib_x, score, d: Path) -> list[list[str]]:
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        return [["torchao PT2E", "-", f"not available ({type(e).__name__})", "-", "-", "-"]]
    t0 = time.perf_counter()
    with warnings_off():
        dyn = ({0: torch.export.Dim.DYNAMIC},)
        ex2 = (calib_x[0][:2],)  # batch 1 would be specialised
        exported = torch.export.export(model, ex2, dynamic_shapes=dyn).module()
        quantizer = xiq.X86InductorQuantizer().set_global(
            xiq.get_default_x86_inductor_quantization_config()
        )
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for x in calib_x:
                prepared(x)
        converted = convert_pt2e(prepared)
    secs = time.perf_counter() - t0
    rows = [
        [
            "torchao PT2E (X86Inductor)",
            "PyTorch",
            *score(lambda x: converted(x)),
            "-",
            f"{secs:.1f}",
        ]
    ]
    try:
        path = gort.export(graphopt.Graph(converted, example), d / "digits_pt2e.onnx")
        rows.append(
            [
                "torchao PT2E (X86Inductor)",
                "ORT",
                *score(_ort(path)),
                op_summary(ort_ops(path)),
                "-",
            ]
        )
    except Exception as e:
        rows.append(["torchao PT2E", "ORT", f"export failed: {e}"[:80], "-", "-", "-"])
    return rows


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- speed ----------------------------------------------------------------------------------------
def speed(d: Path, models: list[str], calib_batches: int, rounds: int, runs: int):
    reg = registry()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for spec in models:
        name, _, pipeline = spec.partition("+")
        model, x = load_model(f"torchvision:{name}")
        calib = [torch.randn(1, *x[0].shape[1:], generator=gen) for _ in range(calib_batches)]
        fp32 = graphopt.compress(model, "fold-bn", example_inputs=x)
        base = (
            fp32
            if not pipeline
            else Pipeline.parse(pipeline, registry=reg).run(fp32.graph.copy(), data=calib)
        )
        t0 = time.perf_counter()
        ours = Pipeline.parse("qdq", registry=reg).run(base.graph.copy(), data=calib)
        t_ours = time.perf_counter() - t0
        paths = {
            "fp32": gort.export(fp32.graph, d / f"{name}_fp32.onnx"),
            "base": gort.export(base.graph, d / f"{name}_base.onnx"),
            "qdq": gort.export(ours.graph, d / f"{name}_qdq.onnx"),
        }
        t0 = time.perf_counter()
        paths["ort"] = ort_quantize(paths["base"], d / f"{name}_ort.onnx", calib)
        t_ort = time.perf_counter() - t0
        if not pipeline:
            del paths["base"]
        ms = latency(paths, rounds, runs)
        f_med, f_min = ms["fp32"]
        for key, label, secs in (
            ("qdq", "graphopt qdq", t_ours),
            ("ort", "ORT quantize_static", t_ort),
        ):
            med, mn = ms[key]
            rows.append(
                [
                    spec.replace("+", " + "),
                    label,
                    f"{f_med:.2f}",
                    f"{med:.2f}",
                    f"{f_med / med:.2f}x",
                    f"{f_min / mn:.2f}x",
                    op_summary(ort_ops(paths[key])),
                    f"{secs:.1f}",
                ]
            )
        if pipeline:
            med, mn = ms["base"]
            rows.append(
                [
                    spec.replace("+", " + "),
                    "(float, before int8)",
                    f"{f_med:.2f}",
                    f"{med:.2f}",
                    f"{f_med / med:.2f}x",
                    f"{f_min / mn:.2f}x",
                    "-",
                    "-",
                ]
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        default="resnet18,mobilenet_v2,resnet18+prune(ratio=0.5)",
        help="torchvision names; NAME+PIPELINE runs PIPELINE (after fold-bn) before int8",
    )
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    import onnxruntime

    print(
        f"# {' '.join(sys.argv)}\n# {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if not args.skip_digits:
            rows = digits_accuracy(d, args.calib_batches)
            print("\n## digits:vgg top-1 (test split, 360 images)\n")
            head = [
                "quantizer",
                "runs in",
                "top-1",
                "logit SQNR vs fp32 (dB)",
                "ORT kernels (int/float)",
                "quantize s",
            ]
            print(render(head, rows, markdown=True))
        if not args.skip_speed:
            rows = speed(d, args.models.split(","), args.calib_batches, args.rounds, args.runs)
            print(
                f"\n## ORT latency, 1 thread, batch 1 ({args.rounds} rounds x {args.runs} runs)\n"
            )
            head = [
                "model",
                "int8 by",
                "fp32 ms",
                "int8 ms",
                "speed-up",
                "speed-up (best rounds)",
                "ORT kernels (int/float)",
                "quantize s",
            ]
            print(render(head, rows, markdown=True))


if __name__ == "__main__":
    main()
