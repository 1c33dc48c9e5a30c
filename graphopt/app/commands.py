"""The other commands: ``passes``, ``inspect``, ``sweep``, ``bench``, ``emit-c``, ``demo``."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from graphopt.app.console import DEMO_MODEL, _out, _quiet_stdout, _UsageError, progress
from graphopt.app.run import _check_data_fits, _load, _ort, _shape_text, _trace
from graphopt.app.staging import staged_outputs
from graphopt.errors import GraphoptError
from graphopt.table import render

log = logging.getLogger(__name__)


# -- passes ------------------------------------------------------------------------------------
def cmd_passes(args: argparse.Namespace) -> int:
    """Every registered pass with its origin, kind, summary and options."""
    from graphopt.options import option_help
    from graphopt.registry import REGISTRY

    blocks = []
    for name, cls in REGISTRY.items():
        kind = "exact" if cls.exact else "lossy"
        lines = [f"{name}  [{kind}, {REGISTRY.origin(name)}]"]
        if cls.summary():
            lines.append(f"    {cls.summary()}")
        rows = option_help(cls.Options)
        if rows:
            table = render(["option", "type", "default", "help"], [list(r) for r in rows])
            lines += ["    " + line for line in table.splitlines()]
        else:
            lines.append("    (no options)")
        blocks.append("\n".join(lines))
    _out("\n\n".join(blocks))
    return 0


# -- inspect -----------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    """Per-layer cost table and totals."""
    from graphopt.cost import cost_of

    model, inputs = _load(args.model, args.input_shape)
    graph = _trace(model, inputs, args.leaf)
    cost = cost_of(graph)
    _out(f"{args.model}: input {_shape_text(inputs[0].shape)}, {len(graph.nodes)} graph nodes")
    _out(cost.table())
    _out(
        f"\ntotal: {cost.params:,} params, {cost.macs:,} MACs, {cost.bytes:,} bytes "
        f"({cost.bytes / 2**20:.2f} MiB)"
    )
    return 0


# -- sweep -------------------------------------------------------------------------------------
SWEEP_TEMPLATE = "fold-bn,prune(ratio={ratio}),distill(epochs=10),qdq"


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the pipeline template per ratio; write sweep.csv and tradeoff.png."""
    from graphopt.app.sweep import expand, plot, run_sweep, table_rows, write_csv
    from graphopt.manager import Pipeline
    from graphopt.zoo.models import load_data

    for r in args.ratios:
        Pipeline.parse(expand(args.pipeline_template, r))  # bad templates fail before loading
    data = load_data(args.data)
    model, inputs = _load(args.model, args.input_shape)
    _check_data_fits(data, inputs)
    out = Path(args.out)
    with staged_outputs(out) as stage:
        points = run_sweep(
            model,
            inputs,
            data,
            args.ratios,
            args.pipeline_template,
            threads=args.threads,
            runs=args.runs,
            progress=progress,
        )
        write_csv(points, stage / "sweep.csv")
        png = plot(points, stage / "tradeoff.png", title=f"{args.model} on {args.data}")
    head = ["ratio", "variant", "params", "MACs", "top-1 (ORT)", "ORT ms"]
    _out(render(head, table_rows(points)))
    written = "sweep.csv" + (", tradeoff.png" if png else "")
    _out(f"\nwrote {written} to {out}")
    return 0


# -- bench -------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """ORT latency of an .onnx file, or torch vs ORT latency of a model spec."""
    ort_backend = _ort()
    rows = []
    if args.model.endswith(".onnx"):
        path = Path(args.model)
        if not path.is_file():
            raise GraphoptError(f"ONNX file {str(path)!r} does not exist")
        rows.append(
            ["onnxruntime", ort_backend.benchmark(path, threads=args.threads, runs=args.runs)]
        )
        title = f"{path}"
    else:
        model, inputs = _load(args.model, args.input_shape)
        graph = _trace(model, inputs, args.leaf)
        rows.append(
            [
                "torch",
                ort_backend.torch_benchmark(
                    graph.module, inputs, threads=args.threads, runs=args.runs
                ),
            ]
        )
        with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
            path = Path(tmp) / "model.onnx"
            with _quiet_stdout(args.verbose):
                ort_backend.export(graph, path)
            rows.append(
                ["onnxruntime", ort_backend.benchmark(path, threads=args.threads, runs=args.runs)]
            )
        title = f"{args.model} (input {_shape_text(inputs[0].shape)})"
    _out(f"{title}: {args.runs} runs, {args.threads} thread(s)")
    body = [
        [name, f"{b['median_ms']:.3f}", f"{b['p10_ms']:.3f}", f"{b['p90_ms']:.3f}"]
        for name, b in rows
    ]
    _out(render(["runtime", "median ms", "p10 ms", "p90 ms"], body))
    return 0


# -- emit-c ------------------------------------------------------------------------------------
def cmd_emit_c(args: argparse.Namespace) -> int:
    """ONNX -> C99 sources (header, code, weights) and report.json."""
    from graphopt.backends.c import emit

    path = Path(args.model)
    if not path.exists():
        raise GraphoptError(f"ONNX file {str(path)!r} does not exist")
    shapes: dict[str, tuple[int, ...]] = {}
    for item in args.input_shape:
        key, _, dims = item.partition("=")
        try:
            shapes[key] = tuple(int(d) for d in dims.replace("x", ",").split(",") if d)
        except ValueError:
            raise _UsageError(f"--input-shape {item!r}: expected NAME=1,3,32,32") from None
    report = emit(path, args.out, name=args.name, input_shapes=shapes or None)
    ops = ", ".join(f"{k} {v}" for k, v in sorted(report.get("op_counts", {}).items()))
    _out(f"{args.name}: {ops}")
    _out(
        f"weights {report['weight_bytes']:,} bytes, arena {report['arena_bytes']:,} bytes "
        f"(lower bound {report['arena_lower_bound_bytes']:,})"
    )
    _out(f"wrote {args.name}.h, {args.name}.c, {args.name}_weights.c, report.json to {args.out}")
    return 0


# -- demo --------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """digits:vgg through every demo stage, lowered to ORT and C, measured after each."""
    from graphopt.app.demo import DemoConfig, run_demo, table

    cfg = DemoConfig(
        out=Path(args.out),
        ratio=args.ratio,
        epochs=args.epochs,
        threads=args.threads,
        runs=args.runs,
        cc=args.cc,
        c=not args.no_c,
    )
    result = run_demo(cfg, progress=progress)
    n_test = result.n_test
    _out(f"graphopt demo: {DEMO_MODEL} on the scikit-learn digits test split ({n_test} images)")
    _out(table(result.rows))
    top = [w for w in result.written if "/" not in w]
    n_onnx = sum(w.startswith("stages/") for w in result.written)
    n_c = sum(w.startswith("c/") for w in result.written)
    parts = top + [f"stages/ ({n_onnx} ONNX models)"] + ([f"c/ ({n_c} C builds)"] if n_c else [])
    _out(f"\nwrote {', '.join(parts)} to {cfg.out}")
    return 0
