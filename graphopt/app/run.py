"""``graphopt run``: trace, run the pipeline, export, compare with ONNX Runtime, report."""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt import __version__
from graphopt.app.console import echo, progress, quiet_stdout
from graphopt.app.loading import inputs_text, load_cli_data, load_spec, top1, trace_model
from graphopt.app.ort import load_ort, ort_top1
from graphopt.app.staging import staged_outputs
from graphopt.atomic import write_json
from graphopt.errors import GraphoptError
from graphopt.table import cell, render

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Versions of graphopt, Python and the libraries a report depends on."""
    out = {"graphopt": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "onnx", "onnxruntime", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = "not installed"
    out["platform"] = platform.platform()
    return out


def _validate_print_after(names: Sequence[str]) -> None:
    from graphopt.registry import REGISTRY

    for name in names:
        if name != "all":
            REGISTRY.get(name)  # raises UnknownPassError with the nearest name


def cmd_run(args: argparse.Namespace) -> int:
    """Load, trace, run the pipeline, export; write model.pt2, model.onnx, report.json."""
    from graphopt.cost import cost_of
    from graphopt.distributed import is_main
    from graphopt.instruments import PrintAfter
    from graphopt.manager import Pipeline

    pipeline = Pipeline.parse(args.pipeline)  # bad pipelines fail before anything is loaded
    _validate_print_after(args.print_after)
    t0 = time.perf_counter()
    model, inputs = load_spec(args.model, args.input_shape, args.input, args.trust_pickle)
    data = load_cli_data(args, model, inputs)
    log.info("tracing %s with input %s", args.model, inputs_text(inputs))
    graph = trace_model(model, inputs, args)
    original = graph.copy()
    cost_before = cost_of(original)
    instruments = [PrintAfter(args.print_after, sink=echo)] if args.print_after else []
    out = Path(args.out)
    if not is_main():  # under torchrun: train with the others, write nothing
        with tempfile.TemporaryDirectory(prefix="graphopt-rank-") as scratch:
            pipeline.run(graph, data=data.train if data is not None else None, out_dir=scratch)
        return 0
    distills = any(getattr(spec.cls, "name", "") == "distill" for spec in pipeline.specs)
    with staged_outputs(out, keep=("distill",) if distills else ()) as stage:
        result = pipeline.run(
            graph,
            data=data.train if data is not None else None,
            instruments=instruments,
            out_dir=stage,
            checkpoint_dir=out,
            dump_dir=args.dump_dir,
            progress=progress,
        )
        cost_after = cost_of(result.graph)
        _save_module(result.graph, stage)
        rows = {"original": {"cost": cost_before}, "optimized": {"cost": cost_after}}
        if args.backend == "ort":
            _ort_compare(args, original, result.graph, stage, rows, data)
        elif data is not None and data.has_test:
            rows["original"]["top1"] = top1(original.module, data.test)
            rows["optimized"]["top1"] = top1(result.graph.module, data.test)
        seconds = time.perf_counter() - t0
        report = _run_report(args, pipeline, original.example_inputs, result, rows, seconds)
        write_json(stage / "report.json", final_paths(report, stage, out))
        written = [p.name + ("/" if p.is_dir() else "") for p in stage.iterdir()]
    echo(result.summary())
    echo()
    echo(_run_table(rows, data is not None and data.has_test, args.threads))
    if any(r.name == "distill" for r in result.reports) and (out / "distill").is_dir():
        written.append("distill/ (checkpoints)")
    echo(f"\nwrote {', '.join(sorted(written))} to {out}")
    return 0


def _save_module(graph, stage: Path) -> str:
    """Save the optimized model in ``stage``: ``model.pt2``, a torch.export program that loads
    without unpickling (graphopt and plain torch read it), checked to reload and compute the
    same outputs. A model torch.export cannot capture is pickled to ``model.pt`` instead, with a
    warning (loading that needs --trust-pickle). Returns the file name written."""
    import copy

    from graphopt.metrics import within
    from graphopt.program import load_program, save_program

    path = stage / "model.pt2"
    try:
        save_program(graph.module, graph.example_inputs, path)
        reload = load_program
    except GraphoptError as e:
        log.warning("%s; writing a pickled model.pt instead (loading it needs --trust-pickle)", e)
        path = stage / "model.pt"
        module = copy.deepcopy(graph.module)
        module._tracer_cls = None  # unpickling then re-traces with torch.fx.Tracer
        torch.save(module, path)

        def reload(p):
            return torch.load(p, map_location="cpu", weights_only=False)  # we just wrote it

    try:
        reloaded = reload(path)
        with torch.no_grad():
            same = within(
                reloaded(*graph.example_inputs), graph.module(*graph.example_inputs), 1e-4, 1e-6
            )
    except Exception as e:
        raise GraphoptError(
            f"the optimized model was saved but does not reload ({type(e).__name__}: {e})"
        ) from e
    if not same:
        raise GraphoptError(
            f"the reloaded {path.name} computes different outputs than the optimized graph"
        )
    return path.name


def _ort_compare(args, original, optimized, stage: Path, rows: dict, data) -> None:
    """Export both graphs; record in ``rows`` ORT latency, parity of each ONNX file with its own
    torch graph on several inputs (the example, data batches, the example negated, random
    batches), the optimized file's drift from the original torch model and, with labelled data,
    top-1 accuracy. An export whose parity fails is an error: the file would be wrong."""
    from graphopt.data import probe_inputs
    from graphopt.metrics import drift

    ort_backend = load_ort()
    pool = None if data is None else (data.test if data.has_test else data.train)
    probes = probe_inputs(original.example_inputs, pool)
    with tempfile.TemporaryDirectory(prefix="graphopt-run-") as tmp:
        paths = {"original": Path(tmp) / "original.onnx", "optimized": stage / "model.onnx"}
        for name, graph in (("original", original), ("optimized", optimized)):
            log.info("exporting and timing the %s model in ONNX Runtime", name)
            with quiet_stdout(args.verbose):
                ort_backend.export(
                    graph, paths[name], allow_torchscript=getattr(args, "allow_torchscript", False)
                )
            parity = ort_backend.check_parity(graph, paths[name], batches=probes)
            rows[name]["parity"] = parity
            if _is_quantized(graph):  # int8 in ORT rounds ties and accumulates its own way
                parity["ok"] = parity["cosine"] >= INT8_MIN_COSINE
                parity["criterion"] = f"int8: cosine >= {INT8_MIN_COSINE} on every probe"
                if not parity["ok"]:
                    log.warning(
                        "the exported %s model agrees with its torch graph only to cosine %.5f "
                        "on probe input %d (max|Δ| %.3g)",
                        name,
                        parity["cosine"],
                        parity["worst_input"],
                        parity["max_abs"],
                    )
            elif not parity["ok"]:
                raise GraphoptError(
                    f"the exported {name} model disagrees with its torch graph on probe input "
                    f"{parity['worst_input']} of {parity['inputs_checked']} (max|Δ| "
                    f"{parity['max_abs']:.3g}, relative {parity['rel']:.3g}): the ONNX file "
                    "would be wrong, so nothing was written; rerun with --debug and report it"
                )
            rows[name]["latency"] = ort_backend.benchmark(
                paths[name], threads=args.threads, runs=args.runs
            )
            if data is not None and data.has_test:
                rows[name]["top1"] = top1(graph.module, data.test)
                rows[name]["top1_ort"] = ort_top1(ort_backend, paths[name], data.test, args.threads)
        with torch.no_grad():
            want = original.module(*probes[0])
        want = [t for t in torch.utils._pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
        for name, path in paths.items():  # how far each file is from the original model
            got = [torch.from_numpy(a) for a in ort_backend.run(path, *probes[0])]
            rows[name]["drift"] = drift(got, want)


INT8_MIN_COSINE = 0.999


def final_paths(report: Any, stage: Path, out: Path) -> Any:
    """``report`` with every path into the staging directory pointing into ``out`` instead,
    where the file will be once the run succeeds."""
    if isinstance(report, dict):
        return {k: final_paths(v, stage, out) for k, v in report.items()}
    if isinstance(report, list):
        return [final_paths(v, stage, out) for v in report]
    if isinstance(report, str) and report.startswith(str(stage)):
        return str(out) + report[len(str(stage)) :]
    return report


def _is_quantized(graph) -> bool:
    """Whether ``graph`` holds quantized layers or quantize ops (its ORT parity is then one of
    int8 kernels, not of float arithmetic)."""
    from graphopt.quant.dynamic import DynamicQuantLinear
    from graphopt.quant.modules import FakeQuant, _QATWeighted, _QuantWeighted

    kinds = (FakeQuant, _QATWeighted, _QuantWeighted, DynamicQuantLinear)
    if any(isinstance(m, kinds) for m in graph.module.modules()):
        return True
    return any(
        n.op == "call_function" and "quantize" in str(n.target) for n in graph.module.graph.nodes
    )


def _run_table(rows: dict, with_accuracy: bool, threads: int) -> str:
    latency = f"ORT ms (median, {threads} thread{'s' if threads > 1 else ''})"
    head = ["model", "params", "MACs", "bytes", latency, "ORT vs torch (rel)", "cosine to original"]
    if with_accuracy:
        head += ["top-1 (torch)", "top-1 (ORT)"]
    body = []
    for name, r in rows.items():
        cost = r["cost"]
        row = [
            name,
            cell(cost.params, ","),
            cell(cost.macs, ","),
            cell(cost.bytes, ","),
            cell(_median_ms(r.get("latency")), ".3f"),
            cell(r["parity"]["rel"], ".1e") if r.get("parity") else "-",
            cell(r.get("drift", {}).get("cosine"), ".6f"),
        ]
        if with_accuracy:
            row += [cell(r.get("top1"), ".4f"), cell(r.get("top1_ort"), ".4f")]
        body.append(row)
    return render(head, body)


def _median_ms(bench: dict | None) -> float | None:
    return bench["median_ms"] if bench else None


def _run_report(args, pipeline, inputs, result, rows: dict, seconds: float) -> dict[str, Any]:
    from graphopt.distributed import world_size

    def row_json(r: dict) -> dict[str, Any]:
        d: dict[str, Any] = {"cost": r["cost"].to_dict()}
        for key in ("latency", "parity", "drift", "top1", "top1_ort"):
            if key in r:
                d[key] = r[key]
        return d

    return {
        "command": "run",
        "model": args.model,
        "input_shape": list(inputs[0].shape),
        "pipeline": str(pipeline),
        "data": args.data,
        "backend": args.backend,
        "threads": args.threads,
        "world_size": world_size(),
        "passes": result.to_dict()["passes"],
        "pipeline_seconds": result.seconds,
        "cost": {name: r["cost"].to_dict() for name, r in rows.items()},
        "results": {name: row_json(r) for name, r in rows.items()},
        "seconds": seconds,
        "versions": versions(),
    }
