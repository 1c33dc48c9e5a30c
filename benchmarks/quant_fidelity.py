"""int8 fidelity suite (issue 15): how close each quantizer stays to fp32 on models trained here,
and whether ONNX Runtime, the torch simulation and the C backend compute the same int8 model.

    PYTHONPATH=/tmp/torchao_pkg python benchmarks/quant_fidelity.py [--models vgg,audio]
        [--calib-batches 8] [--cache DIR] [--no-c] [--best "fold-pad,fold-bn,qdq(...)"]
        [--bootstrap 2000] [--ort-cpu EPYC-Rome]

Models (``quant_fidelity_models.py``; trained on first use, a few seconds to a minute each on a CPU, cached under
``--cache``; nothing is downloaded): on scikit-learn's digits a VGG (the zoo's), a residual
CNN, a depthwise-separable CNN, a CNN with BatchNorm *after* ReLU, a CNN with an explicit zero
``F.pad`` before each conv, a CNN with a sigmoid multi-label head (the digit and four
attributes), a ``nn.TransformerEncoder`` over the image rows; on synthetic tones (mixtures of
8 sinusoids in noise, multi-label) the audio-style net (1-D convs, zero ``F.pad`` before each,
BatchNorm after ReLU, sigmoid head) in two widths.

Quantizers, all calibrated on the same batches (the first ``--calib-batches`` training batches
of 32): graphopt ``fold-bn,qdq`` (defaults), graphopt's best options (``--best``), ORT
``quantize_static`` as its docs show it (``quant_pre_process``, then its defaults: QDQ, S8S8,
which its docs suggest for CPUs without VNNI too, though on an emulated AVX2 CPU ORT 1.32
still saturates these models' S8S8 products; plus per-channel; MinMax or Percentile) on the
fp32 export of the same model, and torchao PT2E (``X86InductorQuantizer``) when ``torchao``
imports.

Each int8 model runs in ORT (fused integer kernels, this CPU), in its own simulation (the
graph after ``qdq`` / the converted PT2E module; for ORT's files: ORT with optimisations off,
i.e. the ONNX operator definitions) and in C (``graphopt.backends.c``). Measures against the
fp32 model's outputs on the test split: argmax agreement and output SQNR (dB). "steps" is the
largest difference between two engines in quantization steps of the output (for a float
output behind an integer Gemm/MatMul: one input step through the layer, see ``output_step``).

``--ort-cpu NAME`` runs the ORT column (and ORT's optimised graph) in ORT under qemu-user
emulating the x86 CPU ``NAME`` (e.g. EPYC-Rome: AVX2 without VNNI; ``tests/emulated_cpu.py``)
and gives graphopt's pipelines ``qdq(target=avx2)``, what ``target=auto`` picks on such a CPU.
Everything else (training, quantizing, the simulations, C) runs on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import graphopt
from graphopt.backends import onnxruntime as gort
from graphopt.manager import Pipeline
from graphopt.table import render

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_fidelity_models import MODELS, Case, make_case  # noqa: E402

DEFAULT = "fold-bn,qdq"
BEST = "fold-pad,fold-bn,qdq(rounding=adaround,rounding-iters=500)"
INT_OPS = {
    "QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "MatMulInteger", "ConvInteger",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearSigmoid", "QLinearSoftmax",
}  # fmt: skip
FLOAT_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "Add", "Mul"}


# -- quantizers -----------------------------------------------------------------------------------
@dataclass
class Quantized:
    label: str
    path: Path | None = None
    simulate: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: ORT's spec reference
    error: str = ""
    notes: dict = field(default_factory=dict)


def graphopt_qdq(case: Case, pipeline: str, path: Path) -> Quantized:
    result = graphopt.compress(case.model, Pipeline.parse(pipeline), case.example, data=case.calib)
    qrep = next(r for r in result.reports if r.name == "qdq").details
    gm = result.graph.module
    gort.export(result.graph, path)
    notes = {"float_ops": [f["op"] for f in qrep.get("float_ops", [])]}
    return Quantized(f"graphopt {pipeline}", path, lambda x: gm(x), notes=notes)


class _Reader:
    def __init__(self, name: str, batches: list[np.ndarray]):
        self.name, self.batches, self.i = name, batches, 0

    def get_next(self):
        self.i += 1
        return {self.name: self.batches[self.i - 1]} if self.i <= len(self.batches) else None

    def rewind(self):
        self.i = 0


def ort_tool(case: Case, fp32: Path, path: Path, method: str, **extra) -> Quantized:
    """ORT's quantize_static as its documentation shows it: quant_pre_process, then QDQ,
    per-channel, U8S8 (its defaults) with ``method`` calibration."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre))
    except Exception as e:  # noqa: BLE001 - fall back to the export as is
        logging.warning("quant_pre_process failed on %s (%s)", case.name, e)
        pre = fp32
    name = onnx.load(str(pre)).graph.input[0].name
    size = batch_size(pre)
    calib = [b for x in case.calib for b in x.split(size)]
    reader = _Reader(name, [x.numpy() for x in calib])
    quantize_static(
        str(pre),
        str(path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        calibrate_method=getattr(CalibrationMethod, method),
        **extra,
    )
    tag = ",".join(f"{k}={v}" for k, v in extra.items())
    return Quantized(f"ORT quantize_static {method}{f' ({tag})' if tag else ''}", path)


def pt2e(case: Case, path: Path) -> Quantized:
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        return Quantized("torchao PT2E", error=f"not importable ({type(e).__name__})")
    with _quiet():
        dyn = ({0: torch.export.Dim.DYNAMIC},)
        exported = torch.export.export(case.model, (case.calib[0][:2],), dynamic_shapes=dyn)
        quantizer = xiq.X86InductorQuantizer().set_global(
            xiq.get_default_x86_inductor_quantization_config()
        )
        prepared = prepare_pt2e(exported.module(), quantizer)
        with torch.no_grad():
            for x in case.calib:
                prepared(x)
        converted = convert_pt2e(prepared)
        q = Quantized("torchao PT2E (X86Inductor)", None, lambda x: converted(x))
        try:
            gort.export(graphopt.Graph(converted, case.example), path)
            q.path = path
        except Exception as e:  # noqa: BLE001 - reported in the table
            q.error = f"ONNX export failed: {str(e).splitlines()[0][:60]}"
    return q


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- engines and measures -------------------------------------------------------------------------
def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    noise = float(((out.astype(np.float64) - ref) ** 2).sum())
    return (
        math.inf
        if noise == 0
        else 10 * math.log10(float((ref.astype(np.float64) ** 2).sum()) / noise)
    )


def agreement(ref: np.ndarray, out: np.ndarray) -> float:
    return float((ref.argmax(1) == out.argmax(1)).mean())


def paired_bootstrap(
    ref: np.ndarray, a: np.ndarray, b: np.ndarray, reps: int = 2000, seed: int = 0
) -> dict:
    """How sure is "``a`` is closer to ``ref`` than ``b``" on this test set? The test inputs are
    resampled with replacement ``reps`` times, the same draw for both (paired); returns the
    differences ``a - b`` of SQNR (dB) and argmax agreement with their 2.5/97.5 percentiles,
    the fewest inputs that hold half of ``a``'s and ``b``'s noise power, and the fp32 top-2
    margins of the inputs where exactly one of them disagrees with fp32 on the argmax."""
    ref, a, b = (np.asarray(v, np.float64).reshape(len(ref), -1) for v in (ref, a, b))
    na, nb = ((a - ref) ** 2).sum(1), ((b - ref) ** 2).sum(1)
    top = ref.argmax(1)
    ha, hb = a.argmax(1) == top, b.argmax(1) == top
    idx = np.random.default_rng(seed).integers(0, len(ref), (reps, len(ref)))
    with np.errstate(divide="ignore"):
        d_sqnr = 10 * np.log10(nb[idx].sum(1) / na[idx].sum(1))
    d_agree = ha[idx].mean(1) - hb[idx].mean(1)
    part = np.sort(ref, 1)
    margin = part[:, -1] - part[:, -2] if ref.shape[1] > 1 else np.abs(ref[:, 0])

    def half(noise):
        c = np.cumsum(np.sort(noise)[::-1])
        return int(np.searchsorted(c, 0.5 * c[-1]) + 1)

    full = 10 * math.log10(nb.sum() / na.sum()) if na.sum() and nb.sum() else math.inf
    return {
        "sqnr": (full, *map(float, np.percentile(d_sqnr, [2.5, 97.5]))),
        "agree": (float(ha.mean() - hb.mean()), *map(float, np.percentile(d_agree, [2.5, 97.5]))),
        "half_noise": (half(na), half(nb), len(ref)),
        "disputed": sorted(float(margin[i]) for i in np.flatnonzero(ha != hb)),
        "median_margin": float(np.median(margin)),
    }


def batch_size(path: Path) -> int:
    """256, or 1 when the file only runs at batch 1 (a leaf module's export can fix shapes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # the probe's failure is expected, not news
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        sess.run(
            None, {sess.get_inputs()[0].name: np.zeros([2, *_input_shape(path)[1:]], np.float32)}
        )
        return 256
    except Exception:  # noqa: BLE001 - any failure: batch 1 only
        return 1


def _input_shape(path: Path) -> list[int]:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value or 1 for d in dims]


def emulation():
    """tests/emulated_cpu.py, imported by path (ORT under qemu-user)."""
    if "emulated_cpu" not in sys.modules:
        file = Path(__file__).resolve().parents[1] / "tests" / "emulated_cpu.py"
        spec = importlib.util.spec_from_file_location("emulated_cpu", file)
        sys.modules["emulated_cpu"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules["emulated_cpu"]


def with_target(pipeline: str, target: str) -> str:
    """``pipeline`` with ``target=`` added to each ``qdq`` that names none."""

    def sub(m: re.Match) -> str:
        opts = m.group(1)
        if opts and "target=" in opts:
            return m.group(0)
        return f"qdq(target={target}{',' + opts[1:-1] if opts and opts != '()' else ''})"

    return re.sub(r"\bqdq(\([^)]*\))?", sub, pipeline)


def run_ort(
    path: Path, x: torch.Tensor, reference: bool = False, cpu: str | None = None, opt=None
) -> np.ndarray:
    """ORT's outputs for ``x``: this CPU, or the emulated x86 ``cpu`` (fused kernels only; ``opt``
    saves the graph ORT optimised there)."""
    if cpu and not reference:
        name = onnx.load(str(path)).graph.input[0].name
        outs = emulation().run_ort_emulated(
            path, {name: x.numpy()}, cpu, batch=batch_size(path), optimized_model_path=opt
        )
        return outs[0]
    sess = gort.session(path, reference=reference)
    return np.concatenate([gort.run(sess, b)[0] for b in x.split(batch_size(path))])


def run_c(path: Path, x: torch.Tensor) -> np.ndarray:
    from graphopt.backends.c import build

    cm = build(path)
    xs = x.numpy()
    return np.concatenate([cm.run(xs[i : i + 1])[0] for i in range(len(xs))])


def ort_ops(path: Path, tmp: Path, opt: Path | None = None) -> str:
    """Integer/float compute ops in ORT's optimised graph (``opt`` when already written)."""
    if opt is None or not opt.is_file():
        opt = tmp / f"{path.stem}.opt.onnx"
        gort.session(path, optimized_model_path=opt)
    ops = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    ints = sum(v for k, v in ops.items() if k in INT_OPS)
    return f"{ints}/{sum(v for k, v in ops.items() if k in FLOAT_OPS)}"


def output_step(path: Path) -> float | None:
    """The size of one quantization step at the model's output: the output DequantizeLinear's
    scale, or, for a float output computed by a Gemm/MatMul from a dequantized input, the most
    one step on every input element moves an output (``s_x * max_j sum_i |W_ij|``), shrunk by
    a sigmoid (1/4-Lipschitz) on the way. ``None`` when the output is not behind either."""
    m = onnx.load(str(path))
    prod = {o: n for n in m.graph.node for o in n.output}
    const = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def dq(name):
        n = prod.get(name)
        return n if n is not None and n.op_type == "DequantizeLinear" else None

    name, gain = m.graph.output[0].name, 1.0
    while name in prod:
        n = prod[name]
        if n.op_type == "DequantizeLinear":
            return gain * float(np.max(const[n.input[1]]))
        if n.op_type in ("Gemm", "MatMul"):
            x, w = dq(n.input[0]), dq(n.input[1])
            if x is None or w is None or w.input[0] not in const:
                return None
            scale = np.asarray(const[w.input[1]], np.float64)
            zp = np.asarray(const[w.input[2]] if len(w.input) > 2 and w.input[2] else 0, np.float64)
            wq = const[w.input[0]].astype(np.float64)
            trans = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
            axis = int(next((a.i for a in w.attribute if a.name == "axis"), 1)) % wq.ndim
            shape = [1] * wq.ndim
            if scale.ndim:
                shape[axis] = -1
            wf = np.abs((wq - zp.reshape(shape if zp.ndim else ())) * scale.reshape(shape))
            l1 = wf.sum(axis=1 if trans else 0).max()
            return gain * float(np.max(const[x.input[1]])) * float(l1)
        if n.op_type == "Sigmoid":
            gain *= 0.25
        elif n.op_type == "Add":  # a bias after MatMul: follow the computed operand
            name = next((i for i in n.input if i not in const), n.input[0])
            continue
        elif n.op_type not in ("Softmax", "Identity", "Flatten", "Reshape", "Squeeze"):
            return None
        name = n.input[0]
    return None


def steps(a: np.ndarray | None, b: np.ndarray | None, step: float | None) -> str:
    if a is None or b is None:
        return "-"
    diff = float(np.abs(a.astype(np.float64) - b).max())
    if step is None:
        return f"{diff:.1e} abs"
    return f"{diff / step:.2f}"


def measure(
    case: Case, q: Quantized, ref: np.ndarray, tmp: Path, c: bool, ort_cpu: str | None = None
) -> dict:
    """Outputs of ``q`` in ORT (this CPU or the emulated ``ort_cpu``), its simulation (or ORT's
    spec reference) and C, and measures."""
    x = case.task.x_test
    out: dict = {"label": q.label, "error": q.error}
    engines: dict[str, np.ndarray | None] = {"ort": None, "sim": None, "c": None}
    if q.path is not None:
        opt = tmp / f"{q.path.stem}.{ort_cpu}.onnx" if ort_cpu else None
        engines["ort"] = run_ort(q.path, x, cpu=ort_cpu, opt=opt)
        out["int_ops"] = ort_ops(q.path, tmp, opt)
        if q.simulate is None:
            engines["sim"] = run_ort(q.path, x, reference=True)
        if c:
            try:
                engines["c"] = run_c(q.path, x)
            except Exception as e:  # noqa: BLE001 - reported in the table
                out["c_error"] = str(e).splitlines()[0][:70]
    if q.simulate is not None:
        with torch.no_grad():
            engines["sim"] = torch.as_tensor(q.simulate(x)).float().numpy()
    for k, v in engines.items():
        if v is not None:
            out[f"agree_{k}"], out[f"sqnr_{k}"] = agreement(ref, v), sqnr(ref, v)
    out["outputs"] = engines["ort"]  # for --bootstrap; not printed
    step = output_step(q.path) if q.path is not None else None
    out["steps_sim"] = steps(engines["ort"], engines["sim"], step)
    out["steps_c"] = steps(engines["ort"], engines["c"], step)
    out["steps_sim_c"] = steps(engines["sim"], engines["c"], step)
    out["one_step"] = all(
        s != "-" and not s.endswith("abs") and float(s) <= 1.001
        for s in (out["steps_sim"], out["steps_c"] if c else "0")
    )
    return out


def quantizers(
    case: Case, tmp: Path, best: str, ort_extra: bool = False, target: str | None = None
) -> list[Quantized]:
    fp32 = gort.export(graphopt.trace(case.model, case.example), tmp / f"{case.name}_fp32.onnx")
    out = []
    for i, pipeline in enumerate((DEFAULT, best)):
        pipeline = with_target(pipeline, target) if target else pipeline
        try:
            out.append(graphopt_qdq(case, pipeline, tmp / f"{case.name}_qdq{i}.onnx"))
        except Exception as e:  # noqa: BLE001 - reported in the table
            out.append(Quantized(f"graphopt {pipeline}", error=str(e).splitlines()[0][:80]))
    settings = [("MinMax", {}), ("Percentile", {})]
    if ort_extra:
        settings.append(("MinMax", {"reduce_range": True}))
    for method, extra in settings:
        p = tmp / f"{case.name}_ort_{method}{len(extra)}.onnx"
        try:
            out.append(ort_tool(case, fp32, p, method, **extra))
        except Exception as e:  # noqa: BLE001 - reported in the table
            out.append(Quantized(f"ORT quantize_static {method}", error=str(e)[:80]))
    out.append(pt2e(case, tmp / f"{case.name}_pt2e.onnx"))
    return out


def fmt(v, spec=".4f") -> str:
    if v is None:
        return "-"
    return "inf" if v == math.inf else format(v, spec)


def rows_for(case: Case, results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        head = [case.name, f"{case.accuracy:.4f}", r["label"].replace("graphopt ", "")]
        if r.get("error") and "agree_sim" not in r:
            rows.append([*head, r["error"]])
            continue
        cells = []
        for k in ("ort", "sim", "c"):
            cells += [fmt(r.get(f"agree_{k}")), fmt(r.get(f"sqnr_{k}"), ".1f")]
        if r.get("c_error"):
            cells[4] = f"C: {r['c_error']}"
        steps_ = [r["steps_sim"], r["steps_c"], r["steps_sim_c"]]
        rows.append([*head, r.get("int_ops", "-"), *cells, *steps_])
    return rows


BOOT_HEAD = [
    "model", "graphopt defaults vs", "SQNR ORT diff (95% CI)", "agree ORT diff (95% CI)",
    "inputs with half the noise (defaults/other/all)", "fp32 margin of disputed inputs (median)",
]  # fmt: skip


def bootstrap_rows(summary: dict, reps: int) -> list[list[str]]:
    """Paired bootstrap of graphopt's defaults against each other quantizer, per model (ORT)."""
    rows = []
    for name, s in summary.items():
        ours = s["results"][0]
        if ours.get("outputs") is None:
            continue
        for r in s["results"][1:]:
            if r.get("outputs") is None or r["label"].startswith("graphopt"):
                continue
            b = paired_bootstrap(s["ref"], ours["outputs"], r["outputs"], reps)
            d, lo, hi = b["sqnr"]
            da, alo, ahi = b["agree"]
            ha, hb, n = b["half_noise"]
            disputed = ", ".join(f"{m:.3f}" for m in b["disputed"][:6]) or "none"
            rows.append([
                name, r["label"], f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]",
                f"{da:+.4f} [{alo:+.4f}, {ahi:+.4f}]", f"{ha}/{hb}/{n}",
                f"{disputed} ({b['median_margin']:.2f})",
            ])  # fmt: skip
    return rows


HEAD = [
    "model", "fp32 acc", "quantizer", "ORT int/float ops", "agree ORT", "SQNR ORT",
    "agree sim", "SQNR sim", "agree C", "SQNR C", "steps ORT-sim", "steps ORT-C", "steps sim-C",
]  # fmt: skip


def run_suite(
    names, cache, calib_batches, best, c=True, ort_extra=False, epochs=None, log=print, ort_cpu=None
):
    """The table rows, verdicts and raw outputs; ``ort_cpu``: the ORT column runs on that
    emulated x86 CPU (without VNNI) and graphopt's ``qdq`` gets ``target=avx2``."""
    rows, verdicts, summary = [], [], {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for name in names:
            case = make_case(name, cache, calib_batches, epochs)
            log(
                f"# {name}: fp32 accuracy {case.accuracy:.4f} (trained/loaded in {case.train_s:.0f}s)"
            )
            with torch.no_grad():
                ref = case.model(case.task.x_test).numpy()
            results = []
            for q in quantizers(case, tmp, best, ort_extra, "avx2" if ort_cpu else None):
                t0 = time.perf_counter()
                if q.path is None and q.simulate is None:
                    results.append({"label": q.label, "error": q.error})
                else:
                    results.append(measure(case, q, ref, tmp, c, ort_cpu))
                log(f"  {q.label}: {time.perf_counter() - t0:.1f}s")
            summary[name] = {"ref": ref, "results": results}
            rows += rows_for(case, results)
            ours = [r for r in results if r["label"].startswith("graphopt")]
            ok = all(r.get("one_step") for r in ours)
            verdicts.append(
                f"{name}: ORT == torch == C within one step: {'yes' if ok else 'NO'} "
                f"(graphopt defaults {results[0].get('steps_sim')}/{results[0].get('steps_c')}, "
                f"best {results[1].get('steps_sim')}/{results[1].get('steps_c')} steps)"
            )
    return rows, verdicts, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--best", default=BEST, help="graphopt's 'best options' pipeline")
    ap.add_argument("--cache", default=None, help="trained models (default: the graphopt cache)")
    ap.add_argument("--no-c", action="store_true", help="skip the C backend")
    ap.add_argument("--ort-reduce-range", action="store_true", help="add ORT reduce_range rows")
    ap.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="add a table: graphopt defaults minus each other quantizer, SQNR and agreement "
        "in ORT with 95%% intervals from N paired resamples of the test inputs",
    )
    ap.add_argument(
        "--ort-cpu",
        default=None,
        metavar="NAME",
        help="run the ORT column under qemu-user emulating x86 CPU NAME (e.g. EPYC-Rome: AVX2, "
        "no VNNI) and give graphopt's qdq target=avx2",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import onnxruntime

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    onnxruntime.set_default_logger_severity(4)  # batch-1 probes fail loudly otherwise

    from graphopt.cpu import cpu_int8
    from graphopt.zoo.digits import cache_dir

    cache = Path(args.cache) if args.cache else cache_dir() / "fidelity"
    cpu = cpu_int8()
    print(
        f"# {' '.join(sys.argv)}\n# {cpu.describe()} -> int8 target {cpu.target}; "
        f"{platform.machine()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    if args.ort_cpu:
        print(f"# ORT column: {emulation().describe(args.ort_cpu)}; graphopt qdq target=avx2")
    rows, verdicts, summary = run_suite(
        args.models.split(","), cache, args.calib_batches, args.best, not args.no_c,
        args.ort_reduce_range, ort_cpu=args.ort_cpu,
    )  # fmt: skip
    print()
    print(render(HEAD, rows, markdown=True))
    print()
    print("\n".join(f"- {v}" for v in verdicts))
    if args.bootstrap:
        print()
        print(render(BOOT_HEAD, bootstrap_rows(summary, args.bootstrap), markdown=True))


if __name__ == "__main__":
    main()
