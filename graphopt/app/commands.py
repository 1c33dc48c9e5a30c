"""The other commands: ``passes``, ``inspect``, ``sweep``, ``bench``, ``emit-c``, ``demo``."""

from __future__ import annotations

import argparse
import tempfile
from itertools import islice
from pathlib import Path

from graphopt.app import demo
from graphopt.app.console import UsageError, echo, progress, quiet_stdout
from graphopt.app.loading import inputs_text, load_cli_data, load_spec, shape_text, trace_model
from graphopt.app.ort import load_ort
from graphopt.app.staging import staged_outputs
from graphopt.errors import DataError, GraphoptError
from graphopt.table import cell, render


# -- passes ------------------------------------------------------------------------------------
def cmd_passes(args: argparse.Namespace) -> int:
    """Every registered pass with its origin, kind, summary and options."""
    from graphopt.options import option_help
    from graphopt.registry import REGISTRY

    blocks = []
    items = REGISTRY.items()
    if getattr(args, "name", None):
        items = [(args.name, REGISTRY.get(args.name))]  # unknown: UnknownPassError, nearest name
    for name, cls in items:
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
    echo("\n\n".join(blocks))
    return 0


# -- inspect -----------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    """Per-layer cost table and totals."""
    from graphopt.cost import cost_of

    model, inputs = load_spec(args.model, args.input_shape, args.input, args.trust_pickle)
    data = None
    if args.quant_sensitivity:
        if not args.data:
            raise DataError("--quant-sensitivity needs --data (calibration batches)")
        data = load_cli_data(args, model, inputs)
    graph = trace_model(model, inputs, args)
    cost = cost_of(graph)
    echo(f"{args.model}: input {inputs_text(inputs)}, {len(graph.nodes)} graph nodes")
    echo(cost.table())
    echo(
        f"\ntotal: {cost.params:,} params, {cost.macs:,} MACs, {cost.bytes:,} bytes "
        f"({cost.bytes / 2**20:.2f} MiB)"
    )
    if args.quant_sensitivity:
        from graphopt.data import iter_batches
        from graphopt.passes.qdq.sensitivity import quant_sensitivity

        batches = [x[0] if len(x) == 1 else x for x, _ in islice(iter_batches(data.train), 8)]
        rows = quant_sensitivity(graph, batches, progress=progress)
        echo("\nint8 sensitivity (each layer quantized alone; lowest SQNR hurts most):")
        echo(
            render(
                ["layer", "kind", "output SQNR dB"],
                [[r["layer"], r["kind"], cell(r["sqnr_db"], ".1f")] for r in rows],
            )
        )
    return 0


# -- sweep -------------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the pipeline template per ratio; write sweep.csv and tradeoff.png."""
    from graphopt.app.sweep import expand, plot, run_sweep, table, write_csv
    from graphopt.manager import Pipeline

    for r in args.ratios:
        Pipeline.parse(expand(args.pipeline_template, r))  # bad templates fail before loading
    model, inputs = load_spec(args.model, args.input_shape, args.input, args.trust_pickle)
    data = load_cli_data(args, model, inputs)
    if not data.has_test:
        raise DataError(
            f"sweep measures accuracy: --data {args.data} needs labels (a held-out test split)"
        )
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
    echo(table(points))
    written = "sweep.csv" + (", tradeoff.png" if png else "")
    echo(f"\nwrote {written} to {out}")
    return 0


# -- bench -------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """ORT latency of an .onnx file, or torch vs ORT latency of a model spec."""
    ort_backend = load_ort()
    rows = []
    if args.model.endswith(".onnx"):
        path = Path(args.model)
        if not path.is_file():
            raise GraphoptError(f"ONNX file {str(path)!r} does not exist")
        shapes = _bench_shapes(path, args)
        inputs = None
        if shapes:
            inputs = [_random_input(shape, dtype) for shape, dtype in shapes.values()]
        rows.append(
            [
                "onnxruntime",
                ort_backend.benchmark(path, threads=args.threads, runs=args.runs, inputs=inputs),
            ]
        )
        title = f"{path}" + (
            f" (input {', '.join(shape_text(s) for s, _ in shapes.values())})" if shapes else ""
        )
    else:
        model, inputs = load_spec(args.model, args.input_shape, args.input, args.trust_pickle)
        graph = trace_model(model, inputs, args)
        rows.append(
            [
                "torch",
                ort_backend.torch_benchmark(
                    graph.module, graph.example_inputs, threads=args.threads, runs=args.runs
                ),
            ]
        )
        with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
            path = Path(tmp) / "model.onnx"
            with quiet_stdout(args.verbose):
                ort_backend.export(graph, path)
            rows.append(
                ["onnxruntime", ort_backend.benchmark(path, threads=args.threads, runs=args.runs)]
            )
        title = f"{args.model} (input {inputs_text(inputs)})"
    echo(f"{title}: {args.runs} runs, {args.threads} thread(s)")
    body = [
        [name, *(cell(b[key], ".3f") for key in ("median_ms", "p10_ms", "p90_ms"))]
        for name, b in rows
    ]
    echo(render(["runtime", "median ms", "p10 ms", "p90 ms"], body))
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
            raise UsageError(f"--input-shape {item!r}: expected NAME=1,3,32,32") from None
    check_onnx_shapes(path, shapes)
    with staged_outputs(Path(args.out)) as stage:
        report = emit(
            path,
            stage,
            name=args.name,
            input_shapes=shapes or None,
            patches=args.patches,
            ram_budget=args.ram_budget,
        )
    ops = ", ".join(f"{k} {v}" for k, v in sorted(report.get("op_counts", {}).items()))
    echo(f"{args.name}: {ops}")
    echo(
        f"weights {report['weight_bytes']:,} bytes, arena {report['arena_bytes']:,} bytes "
        f"(lower bound {report['arena_lower_bound_bytes']:,})"
    )
    if report.get("patches"):
        p = report["patches"]
        echo(
            f"patches {p['grid'][0]}x{p['grid'][1]} up to {p['cut_tensor']!r}: arena "
            f"{p['arena_unpatched_bytes']:,} -> {report['arena_bytes']:,} bytes, "
            f"{p['recompute_pct']}% more MACs"
        )
    echo(f"wrote {args.name}.h, {args.name}.c, {args.name}_weights.c, report.json to {args.out}")
    return 0


def onnx_inputs(path: Path) -> list[tuple[str, list[int | str], int]]:
    """``(name, dims, element type)`` of each graph input of the ONNX file (symbolic dims as
    their names), read without its weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise GraphoptError(f"cannot read {str(path)!r} as ONNX: {e}") from e
    weights = {t.name for t in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in weights:
            continue
        t = i.type.tensor_type
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim
        ]
        out.append((i.name, dims, t.elem_type))
    return out


def check_onnx_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Each given shape names an input of the file and agrees with its fixed dimensions."""
    inputs = {name: dims for name, dims, _ in onnx_inputs(path)}
    for name, shape in shapes.items():
        if name not in inputs:
            raise DataError(
                f"--input-shape {name}=...: {str(path)!r} has no input {name!r} "
                f"(its inputs: {', '.join(inputs) or 'none'})"
            )
        dims = inputs[name]
        fixed_ok = len(dims) == len(shape) and all(
            not isinstance(d, int) or d in (0, s) for d, s in zip(dims, shape)
        )
        if not fixed_ok:
            want = "x".join(str(d) for d in dims)
            raise DataError(
                f"--input-shape {name}={shape_text(shape)} does not fit {str(path)!r}: input "
                f"{name!r} is {want} (only its symbolic dimensions can be chosen)"
            )


def _bench_shapes(path: Path, args) -> dict[str, tuple[tuple[int, ...], int]]:
    """``--input-shape`` / ``--input`` for an .onnx file, checked against its inputs."""
    from graphopt.zoo.models import parse_shape

    inputs = onnx_inputs(path)
    if args.input_shape is not None:
        if len(inputs) != 1:
            names = ", ".join(n for n, _, _ in inputs)
            raise DataError(f"{str(path)!r} has several inputs ({names}); use --input NAME=DIMS")
        shapes = {inputs[0][0]: parse_shape(args.input_shape)}
    else:
        shapes = {name: tuple(shape) for name, shape, _ in args.input}
    check_onnx_shapes(path, shapes)
    types = {name: elem for name, _, elem in inputs}
    missing = [n for n, dims, _ in inputs if shapes and n not in shapes]
    if missing:
        raise DataError(f"give a shape for every input of {str(path)!r}; missing: {missing}")
    return {name: (shape, types[name]) for name, shape in shapes.items()}


def _random_input(shape: tuple[int, ...], elem_type: int):
    import numpy as np
    import onnx

    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 2, size=shape).astype(dtype)


# -- demo --------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """digits:vgg through every demo stage, lowered to ORT and C, measured after each."""
    cfg = demo.DemoConfig(
        out=Path(args.out),
        ratio=args.ratio,
        epochs=args.epochs,
        threads=args.threads,
        runs=args.runs,
        cc=args.cc,
        c=not args.no_c,
    )
    result = demo.run_demo(cfg, progress=progress)
    n_test = result.n_test
    echo(f"graphopt demo: {demo.MODEL} on the scikit-learn digits test split ({n_test} images)")
    echo(demo.table(result.rows))
    top = [w for w in result.written if "/" not in w]
    n_onnx = sum(w.startswith("stages/") for w in result.written)
    n_c = sum(w.startswith("c/") for w in result.written)
    parts = top + [f"stages/ ({n_onnx} ONNX models)"] + ([f"c/ ({n_c} C builds)"] if n_c else [])
    echo(f"\nwrote {', '.join(parts)} to {cfg.out}")
    return 0
