"""``qdq``: calibrated int8 quantization with quantize/dequantize pairs that ONNX Runtime runs
as integer kernels.

PTQ (``mode=ptq``, the default):

1. plan (:mod:`graphopt.passes.qdq.placement`): fusion units (conv/linear/add/mul/matmul/concat/
   avg-pool plus a following ReLU/ReLU6/clamp), pass-through ops that share their input's
   qparams, float ops left alone (listed in the report with the reason: LayerNorm, softmax,
   GELU, ...). torch's transformer leaves and ``scaled_dot_product_attention`` are first spelled
   out as Linear/matmul/softmax (:mod:`graphopt.passes.qdq.decompose`, exact; the report's
   ``attention`` lists what was rewritten and what was kept, with the reason);
2. calibrate (:mod:`graphopt.quant.observers`): an observer on every quantized value sees up to
   ``batches`` batches of ``data``; ``minmax``, ``percentile``, ``mse`` or ``entropy`` picks
   the range ``[lo, hi]``, and ``s = (hi - lo) / (qmax - qmin)``, ``z = round(qmin - lo / s)``;
3. fake-quant form (:mod:`graphopt.quant.modules`); ``bias-correction`` (on by default) then
   shifts each layer's bias, layer by layer, so its mean output per channel equals the float
   model's on the calibration data (:mod:`graphopt.passes.qdq.bias`: this removes the mean
   shift that weight *and* upstream activation rounding cause; each channel's shift ``d`` is
   applied with weight ``max(0, 1 - 1/t^2)``, ``t`` = ``d`` over its standard error across the
   calibration samples, so a shift the data cannot tell from rounding noise is left alone;
   ``mode=qat`` leaves the biases to training); ``equalize first rescales conv/linear pairs
   channel by channel (:mod:`graphopt.passes.qdq.equalize`);
4. integer form: ``dequantize(quantize(x))`` on activations, int8 weights
   ``W = s_w W_q`` (symmetric, per output channel by default) and int32 biases
   ``b = s_x s_w b_q``. The graph computes what ORT's QLinearConv / QGemm compute, up to
   float32 rounding.

QAT (``mode=qat``): steps 1-3 only, leaving fake-quant modules with straight-through
gradients (``learn-scales=true``: LSQ scales) for ``distill`` or a training loop; then
``qdq(mode=convert)`` freezes the trained graph into the integer form.

The report lists, per quantized op, the input/output scale and zero point, the weight scales
and the SQNR (dB) of its output against the float model on the first calibration batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.cpu import cpu_int8, resolve_target, weight_qmax
from graphopt.errors import DataError
from graphopt.graph import Graph, node_meta
from graphopt.optypes import call_sites
from graphopt.pass_api import Pass, PassContext, PassResult
from graphopt.passes.qdq.adaround import adaround
from graphopt.passes.qdq.batchnorm import rewrite_batchnorms
from graphopt.passes.qdq.bias import float_bias_correction
from graphopt.passes.qdq.decompose import decompose_attention
from graphopt.passes.qdq.dynamic_matmul import dynamic_matmuls, matmul_report
from graphopt.passes.qdq.equalize import equalize
from graphopt.passes.qdq.placement import matches, plan
from graphopt.passes.qdq.rewrite import (
    QuantizationError,
    calibrate,
    calibration_batches,
    choose_qparams,
    dynamic_report,
    insert_observers,
    quantization_state,
    remove_observers,
    set_submodule,
    to_fake_quant,
    to_integer,
    unit_report,
)
from graphopt.passes.qdq.smooth import smooth
from graphopt.quant.dynamic import DynamicQuantLinear, QuantEmbedding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QDQOptions:
    mode: Literal["ptq", "qat", "convert"] = field(
        default="ptq",
        metadata={
            "help": "ptq: calibrate and write int8; qat: fake-quant for training; "
            "convert: freeze a qat graph to int8"
        },
    )
    weights: Literal["per-channel", "per-tensor"] = field(
        default="per-channel", metadata={"help": "int8 symmetric weight scales"}
    )
    activations: Literal["uint8", "int8", "dynamic"] = field(
        default="uint8",
        metadata={
            "help": "asymmetric activation type; dynamic: Linear layers (and embedding tables), inputs "
            "quantized per call (no calibration)"
        },
    )
    embeddings: Literal["int8", "float"] = field(
        default="int8",
        metadata={
            "help": "activations=dynamic: store nn.Embedding tables as int8 rows with per-row "
            "scales (a lookup dequantizes only the rows it reads), or keep them float"
        },
    )
    matmul: Literal["float", "values", "dynamic"] = field(
        default="float",
        metadata={
            "help": "activations=dynamic: matrix products of two activations (attention's q kT "
            "and p v, torch.matmul/bmm) stay float (as ORT's quantize_dynamic leaves them: int8 "
            "measured at most 3% faster and up to 3 dB less accurate), or dynamic: int8 with "
            "both operands quantized per call; values: only those not feeding a softmax (p v)"
        },
    )
    calibration: Literal["minmax", "percentile", "mse", "entropy"] = field(
        default="minmax", metadata={"help": "how activation ranges are chosen"}
    )
    percentile: float = field(default=99.99, metadata={"help": "for calibration=percentile"})
    batches: int = field(default=32, metadata={"help": "calibration batches (at most)"})
    skip: tuple[str, ...] = field(default=(), metadata={"help": "module-path globs kept in float"})
    override: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": 'per-module settings, "GLOB:key=value;key=value" with key weights, '
            "calibration or percentile (the last matching entry wins)"
        },
    )
    bias_correction: bool = field(
        default=True,
        metadata={
            "help": "per layer, in order, shift the bias so each channel's mean output equals "
            "the float model's (removes the mean shift of weight and activation rounding), "
            "weighted by max(0, 1 - 1/t^2), t: the shift over its standard error"
        },
    )
    equalize: bool = field(
        default=False,
        metadata={"help": "cross-layer equalization of conv/linear pairs before calibration"},
    )
    learn_scales: bool = field(default=False, metadata={"help": "mode=qat: learnable (LSQ) scales"})
    rounding: Literal["nearest", "adaround"] = field(
        default="nearest",
        metadata={
            "help": "weight rounding: nearest, or adaround (learned per weight to minimise "
            "each layer's output error on the calibration data; slower)"
        },
    )
    rounding_iters: int = field(
        default=1000, metadata={"help": "optimisation steps per layer for rounding=adaround"}
    )
    smooth: float = field(
        default=0.0,
        metadata={
            "help": "SmoothQuant alpha in (0, 1]: move activation outliers of LayerNorm -> "
            "Linear groups into the weights before int8 (0: off; 0.5 is typical)"
        },
    )
    batchnorm: Literal["conv", "float"] = field(
        default="conv",
        metadata={
            "help": "BatchNorms left after fold-bn: conv runs each as an int8 depthwise 1x1 "
            "conv (exact rewrite); float leaves it in float between quantized values"
        },
    )
    target: Literal["auto", "vnni", "avx2", "arm"] = field(
        default="auto",
        metadata={
            "help": "the CPU the model will run on: avx2 (x86 without VNNI) keeps weights in "
            "[-63, 63] so ORT's u8 x s8 kernels cannot saturate; auto reads this CPU"
        },
    )

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.batches < 1:
            raise ValueError(f"batches must be at least 1, got {self.batches}")
        if self.learn_scales and self.mode != "qat":
            raise ValueError("learn-scales=true needs mode=qat (scales are learned in training)")
        if self.rounding_iters < 1:
            raise ValueError(f"rounding-iters must be at least 1, got {self.rounding_iters}")
        if self.rounding == "adaround" and (self.mode != "ptq" or self.activations == "dynamic"):
            raise ValueError("rounding=adaround applies to static PTQ (mode=ptq, not dynamic)")
        if not 0.0 <= self.smooth <= 1.0:
            raise ValueError(f"smooth must be in [0, 1] (0: off), got {self.smooth}")
        if self.smooth and self.mode == "convert":
            raise ValueError("smooth applies when quantizing (mode=ptq or qat), not at convert")
        if self.activations == "dynamic" and self.mode != "ptq":
            raise ValueError("activations=dynamic has nothing to train: use mode=ptq")
        if self.matmul != "float" and self.activations != "dynamic":
            raise ValueError(
                f"matmul={self.matmul} applies to activations=dynamic; static qdq quantizes "
                "attention products already (q kT and p v): drop the option"
            )
        parse_overrides(self.override)

    def settings(self, node: fx.Node) -> dict[str, Any]:
        """``weights``, ``calibration`` and ``percentile`` for the module ``node`` belongs to."""
        out: dict[str, Any] = {
            "weights": self.weights,
            "calibration": self.calibration,
            "percentile": self.percentile,
        }
        for glob, values in parse_overrides(self.override):
            if matches((glob,), node):
                out.update(values)
        return out


_OVERRIDE_KEYS = {
    "weights": ("per-channel", "per-tensor"),
    "calibration": ("minmax", "percentile", "mse", "entropy"),
    "percentile": None,
}


def parse_overrides(entries: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """``["features.0:weights=per-tensor;calibration=mse"]`` -> ``[("features.0", {...})]``."""
    out = []
    for entry in entries:
        glob, sep, rest = entry.partition(":")
        if not sep or not glob or not rest:
            raise ValueError(
                f"override {entry!r} must look like GLOB:key=value (keys: "
                f"{', '.join(_OVERRIDE_KEYS)})"
            )
        values: dict[str, Any] = {}
        for item in rest.split(";"):
            key, eq, value = (p.strip() for p in item.partition("="))
            if key not in _OVERRIDE_KEYS or not eq:
                raise ValueError(
                    f"override {entry!r}: unknown setting {key!r} (keys: "
                    f"{', '.join(_OVERRIDE_KEYS)})"
                )
            choices = _OVERRIDE_KEYS[key]
            if choices is None:
                try:
                    values[key] = float(value)
                except ValueError:
                    raise ValueError(f"override {entry!r}: {key} must be a number") from None
                if not 50.0 < values[key] <= 100.0:
                    raise ValueError(f"override {entry!r}: percentile must be in (50, 100]")
            elif value not in choices:
                raise ValueError(f"override {entry!r}: {key} must be one of {', '.join(choices)}")
            else:
                values[key] = value
        out.append((glob, values))
    return out


class QDQ(Pass):
    """Calibrated int8 quantize/dequantize (PTQ or QAT) that ONNX Runtime fuses into integer ops."""

    name = "qdq"
    exact = False
    Options = QDQOptions
    needs_data = True

    @classmethod
    def uses_data(cls, options: QDQOptions) -> bool:
        """Calibration needs data; freezing a QAT graph (``mode=convert``) and dynamic
        quantization do not."""
        return options.mode != "convert" and (
            options.activations != "dynamic" or options.smooth > 0
        )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        opts: QDQOptions = self.options
        gm = graph.module
        state = quantization_state(gm)
        if opts.mode == "convert":
            if state != "qat":
                raise QuantizationError(
                    "qdq(mode=convert) freezes a graph quantized with qdq(mode=qat), but this "
                    f"graph is {'already integer' if state == 'integer' else 'not fake-quantized'}"
                )
            converted = to_integer(gm)
            return PassResult(
                True,
                {
                    "summary": f"froze {len(converted)} fake-quant layers to int8",
                    "layers": sorted(converted),
                },
            )
        if state == "integer":
            raise QuantizationError(
                "the graph is already quantized (it holds quantize/dequantize nodes or int8 "
                "layers from an earlier qdq pass); quantize a float graph, once"
            )
        if state == "qat":
            raise QuantizationError(
                "the graph holds fake-quant modules from qdq(mode=qat); freeze it with "
                "qdq(mode=convert) instead of quantizing it again"
            )
        if state == "calibrating":
            raise QuantizationError("the graph holds calibration observers from a failed qdq run")
        if opts.activations == "dynamic":
            return self._dynamic(graph, ctx)
        if ctx.data is None:
            raise DataError(
                "qdq needs calibration data: pass data=batches (an iterable of input tensors or "
                "(inputs, labels) tuples) to Pipeline.run()/graphopt.compress(), or --data NAME "
                "on the CLI"
            )
        batches = calibration_batches(ctx.batches(), opts.batches)
        dtype = torch.uint8 if opts.activations == "uint8" else torch.int8

        graph.propagate_shapes()
        attention = decompose_attention(gm, lambda n: matches(opts.skip, n) is not None)
        if attention["decomposed"]:
            graph.propagate_shapes()
        equalized = equalize(gm) if opts.equalize else None
        smoothed = self._smooth(gm, batches)
        bn_convs = (
            rewrite_batchnorms(gm, lambda n: matches(opts.skip, n) is not None)
            if opts.batchnorm == "conv"
            else []
        )
        the_plan = plan(gm, opts.skip)
        if not the_plan.units:
            return PassResult(
                False,
                {
                    "summary": "nothing to quantize",
                    "float_ops": the_plan.float_ops,
                    "skipped": the_plan.skipped,
                },
            )
        reference = graph.copy() if opts.mode == "ptq" else None

        op_of = {u.out: u.op for u in the_plan.units}  # a fused ReLU's output: its conv's

        def method(value: fx.Node) -> tuple[str, float]:
            st = opts.settings(op_of.get(value, value))
            return st["calibration"], st["percentile"]

        observers = insert_observers(gm, the_plan, method)
        try:
            calibrate(gm, observers, batches, ctx.progress)
        finally:
            remove_observers(gm)
        qparams = choose_qparams(the_plan, observers, dtype)
        to_fake_quant(
            gm,
            the_plan,
            qparams,
            per_channel=lambda unit: opts.settings(unit.op)["weights"] == "per-channel",
            learnable=opts.learn_scales and opts.mode == "qat",
            weight_qmax=weight_qmax(opts.target),
        )
        rounded = (
            adaround(gm, batches, opts.rounding_iters, ctx.progress)
            if opts.rounding == "adaround"
            else {}
        )
        corrections = {}
        if opts.bias_correction and reference is not None:  # ptq: against the float model
            corrections = float_bias_correction(gm, reference.module, batches, ctx.progress)
        counts: dict[str, int] = {}
        for u in the_plan.units:
            counts[u.kind] = counts.get(u.kind, 0) + 1
        what = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        report: dict = {
            "mode": opts.mode,
            "calibration": {
                "method": opts.calibration,
                "batches": len(batches),
                "samples": sum(int(b[0].shape[0]) if b[0].dim() else 1 for b in batches),
            },
            "float_ops": the_plan.float_ops,
            "float_outputs": [
                {"node": n.name, "module": node_meta(n).module_path or "", "reason": why}
                for n, why in the_plan.float_outputs.items()
            ],
            "skipped": the_plan.skipped,
            "target": _target_report(opts.target),
        }
        if attention["decomposed"] or attention["kept"]:
            report["attention"] = attention
        if bn_convs:
            report["batchnorm_as_conv"] = bn_convs
        if smoothed:
            report["smooth"] = smoothed
        if rounded:
            report["adaround_error_removed"] = rounded
        if equalized is not None:
            report["equalize"] = equalized
        if corrections:
            report["bias_correction"] = corrections
        if opts.mode == "qat":
            report["summary"] = (
                f"fake-quant on {len(the_plan.units)} ops ({what}); "
                f"{len(the_plan.float_ops)} float ops; freeze with qdq(mode=convert)"
            )
            report["activations"] = {v.name: qparams[v].to_dict() for v in the_plan.own}
            return PassResult(True, report)

        to_integer(gm)
        assert reference is not None
        layers = unit_report(reference, gm, the_plan.units, batches[0])
        report["layers"] = layers
        sqnrs = [r["sqnr_db"] for r in layers if r.get("sqnr_db") is not None]
        worst = f"; min SQNR {min(sqnrs):.1f} dB" if sqnrs else ""
        report["summary"] = (
            f"int8 {opts.activations}/{opts.weights}: {len(the_plan.units)} ops ({what}), "
            f"{len(the_plan.float_ops)} float ops{worst}"
        )
        for f in the_plan.float_ops:
            log.info("qdq: %s (%s) stays float: %s", f["node"], f["op"], f["reason"])
        return PassResult(True, report)

    def _smooth(self, gm: fx.GraphModule, batches) -> list[dict[str, Any]]:
        opts: QDQOptions = self.options
        if not opts.smooth:
            return []
        return smooth(gm, batches, opts.smooth, lambda n: matches(opts.skip, n) is not None)

    def _dynamic(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Torch's attention leaves and SDPA are spelled out (as for static qdq), then every
        Linear (not skipped, called once) becomes a :class:`DynamicQuantLinear` and every
        matrix product of two activations a ``graphopt::dynamic_matmul`` (``matmul=``)."""
        opts: QDQOptions = self.options
        gm = graph.module
        graph.propagate_shapes()
        attention = decompose_attention(gm, lambda n: matches(opts.skip, n) is not None)
        if attention["decomposed"]:
            graph.propagate_shapes()
        reference = graph.copy()  # after the (exact) inlining: the same node names
        smoothed = []
        if opts.smooth:
            smoothed = self._smooth(gm, calibration_batches(ctx.batches(), opts.batches))
        sites = call_sites(gm)
        done, skipped = [], []
        for n in gm.graph.nodes:
            if (
                n.op != "call_module"
                or type(gm.get_submodule(str(n.target))) is not torch.nn.Linear
            ):
                continue
            pat = matches(opts.skip, n)
            if pat is not None or sites[str(n.target)] > 1 or len(n.args) != 1 or n.kwargs:
                why = f"skip ({pat})" if pat else "called at several places or with extra arguments"
                skipped.append({"node": n.name, "module": str(n.target), "reason": why})
                continue
            per_channel = opts.settings(n)["weights"] == "per-channel"
            layer = DynamicQuantLinear(
                gm.get_submodule(str(n.target)), per_channel, weight_qmax(opts.target)
            )
            set_submodule(gm, str(n.target), layer)
            done.append(n)
        matmuls, float_ops = dynamic_matmuls(gm, opts.matmul, opts.skip, skipped)
        tables = self._embeddings(gm, sites, skipped) if opts.embeddings == "int8" else []
        report: dict[str, Any] = {}
        if attention["decomposed"] or attention["kept"]:
            report["attention"] = attention
        if float_ops:
            report["float_ops"] = float_ops
        if not done and not tables and not matmuls:
            return PassResult(
                bool(attention["decomposed"]),
                {"summary": "no Linear layer to quantize", "skipped": skipped, **report},
            )
        gm.recompile()
        inputs = graph.example_inputs
        if ctx.data is not None:
            for batch, _ in ctx.batches():
                inputs = batch
                break
        layers = dynamic_report(reference, gm, done + tables, inputs)
        layers += matmul_report(reference, gm, matmuls, inputs)
        sqnrs = [r["sqnr_db"] for r in layers if r.get("sqnr_db") is not None]
        worst = f"; min SQNR {min(sqnrs):.1f} dB" if sqnrs else ""
        mm = f", {len(matmuls)} matmul" if matmuls else ""
        emb = f", {len(tables)} embedding table(s) int8 per row" if tables else ""
        return PassResult(
            True,
            {
                "summary": f"dynamic int8: {len(done)} linear{mm}{emb}{worst}",
                "mode": "ptq",
                "layers": layers,
                "skipped": skipped,
                "target": _target_report(opts.target),
                **report,
                **({"smooth": smoothed} if smoothed else {}),
            },
        )

    def _embeddings(self, gm: fx.GraphModule, sites, skipped: list) -> list[fx.Node]:
        """Every plain ``nn.Embedding`` (not skipped, called once, no max_norm) becomes a
        :class:`QuantEmbedding`."""
        opts: QDQOptions = self.options
        done = []
        for n in gm.graph.nodes:
            if n.op != "call_module" or type(gm.get_submodule(str(n.target))) is not nn.Embedding:
                continue
            emb = gm.get_submodule(str(n.target))
            pat = matches(opts.skip, n)
            if pat is not None or sites[str(n.target)] > 1 or emb.max_norm is not None:
                why = f"skip ({pat})" if pat else "called at several places or with max_norm"
                skipped.append({"node": n.name, "module": str(n.target), "reason": why})
                continue
            set_submodule(gm, str(n.target), QuantEmbedding(emb))
            done.append(n)
        return done


def _target_report(target: str) -> dict[str, Any]:
    """Which int8 target was used, why, and the weight range it implies."""
    chosen = resolve_target(target)
    q = weight_qmax(chosen)
    out: dict[str, Any] = {"target": chosen, "requested": target, "weight_range": [-q, q]}
    if target == "auto":
        out["cpu"] = cpu_int8().describe()
    if chosen == "avx2":
        out["why"] = (
            "x86 without VNNI: ORT adds u8 x s8 products in pairs into int16; 7-bit weights "
            "keep every pair below 32767, so ORT computes the exact integer result"
        )
    return out
