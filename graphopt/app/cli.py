"""The ``graphopt`` command line: ``run``, ``passes``, ``inspect``, ``bench`` and ``demo``.

This is the only place graphopt prints. Bad input exits with status 2 and one line on stderr
starting ``graphopt: error:`` (the traceback only with ``--debug``); an unexpected failure
exits with status 1 and a hint to rerun with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt import __version__
from graphopt.atomic import write_json
from graphopt.errors import DataError, GraphoptError
from graphopt.table import render

log = logging.getLogger(__name__)

PROG = "graphopt"
DEMO_MODEL = "digits:vgg"
DEMO_OUT = "graphopt-demo"
EXIT_USAGE = 2
EXIT_UNEXPECTED = 1


# -- output and progress -----------------------------------------------------------------------
def _out(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


def progress(iterable: Iterable, desc: str = "", total: int | None = None) -> Iterable:
    """A tqdm bar on stderr around ``iterable`` (silent when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable, desc=desc, total=total, file=sys.stderr, leave=False, disable=None, delay=0.5
    )


class _StderrHandler(logging.StreamHandler):
    """Log to whatever ``sys.stderr`` is at the time (pytest's capsys swaps it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def _logging(verbose: int) -> Iterator[None]:
    """Route graphopt's logs to stderr (WARNING, or INFO with -v, DEBUG with -vv) and silence
    third-party warnings and exporter chatter unless -v."""
    logger = logging.getLogger("graphopt")
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(
        logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    )
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            if verbose == 0:
                warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


@contextlib.contextmanager
def _quiet_stdout(verbose: int) -> Iterator[None]:
    """Keep third-party chatter (e.g. the ONNX exporter's progress lines) off stdout: send it
    to stderr with -v, discard it otherwise."""
    sink = sys.stderr if verbose else io.StringIO()
    with contextlib.redirect_stdout(sink):
        yield


# -- staged, atomic outputs --------------------------------------------------------------------
@contextlib.contextmanager
def staged_outputs(out: Path) -> Iterator[Path]:
    """Yield a private staging directory inside ``out``. On success each entry is moved into
    ``out`` by an atomic rename; on failure the staging directory is deleted, so earlier outputs
    in ``out`` stay intact and no partial file is left behind."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraphoptError(f"cannot create the output directory {str(out)!r}: {e}") from e
    stage = Path(tempfile.mkdtemp(prefix=".graphopt-staging-", dir=out))
    try:
        yield stage
        for entry in sorted(stage.iterdir()):
            _replace(entry, out / entry.name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _replace(src: Path, dst: Path) -> None:
    if src.is_dir() and dst.is_dir():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# -- shared helpers ----------------------------------------------------------------------------
def _ort():
    try:
        from graphopt.backends import onnxruntime as ort_backend
    except ImportError as e:
        raise GraphoptError(
            f"the ONNX Runtime backend is unavailable ({e}); use --backend none"
        ) from e
    return ort_backend


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


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_ms(bench: dict | None) -> str:
    return "-" if not bench else f"{bench['median_ms']:.3f}"


def _fmt_acc(acc: float | None) -> str:
    return "-" if acc is None else f"{acc:.4f}"


def _fmt_parity(parity: dict | None) -> str:
    if not parity:
        return "-"
    return f"{parity['rel']:.1e} / {parity['cosine']:.6f}"


def _load(spec: str, input_shape: str | None):
    from graphopt.zoo.models import load_model

    return load_model(spec, input_shape, progress=progress)


def _trace(model, inputs, leaves: Sequence[str] = ()):
    from graphopt.tracing import trace

    return trace(model, inputs, leaf_modules=tuple(leaves))


def _check_data_fits(data, inputs: tuple[torch.Tensor, ...]) -> None:
    want = tuple(inputs[0].shape[1:])
    if tuple(data.input_shape[1:]) != want:
        raise DataError(
            f"--data {data.name} gives inputs of shape {_shape_text(data.input_shape[1:])} per "
            f"sample but the model takes {_shape_text(want)}"
        )


def _ort_top1(ort_backend, onnx_path: Path, batches, threads: int) -> float:
    from graphopt.zoo.digits import evaluate

    sess = ort_backend.session(onnx_path, threads=threads)
    return evaluate(lambda x: ort_backend.run(sess, x.numpy())[0], batches)


def _validate_print_after(names: Sequence[str]) -> None:
    from graphopt.registry import REGISTRY

    for name in names:
        if name != "all":
            REGISTRY.get(name)  # raises UnknownPassError with the nearest name


# -- run ---------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """Load, trace, run the pipeline, export; write model.pt, model.onnx, report.json."""
    from graphopt.cost import cost_of
    from graphopt.distributed import is_main
    from graphopt.instruments import PrintAfter
    from graphopt.manager import Pipeline

    pipeline = Pipeline.parse(args.pipeline)  # bad pipelines fail before anything is loaded
    _validate_print_after(args.print_after)
    data = None
    if args.data:
        from graphopt.zoo.models import load_data

        data = load_data(args.data)
    t0 = time.perf_counter()
    model, inputs = _load(args.model, args.input_shape)
    if data is not None:
        _check_data_fits(data, inputs)
    log.info("tracing %s with input %s", args.model, _shape_text(inputs[0].shape))
    graph = _trace(model, inputs, args.leaf)
    original = graph.copy()
    cost_before = cost_of(original)
    instruments = [PrintAfter(args.print_after, sink=_out)] if args.print_after else []
    out = Path(args.out)
    if not is_main():  # under torchrun: train with the others, write nothing
        with tempfile.TemporaryDirectory(prefix="graphopt-rank-") as scratch:
            pipeline.run(graph, data=data.train if data is not None else None, out_dir=scratch)
        return 0
    with staged_outputs(out) as stage:
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
        _save_module(result.graph, stage / "model.pt")
        rows = {"original": {"cost": cost_before}, "optimized": {"cost": cost_after}}
        if args.backend == "ort":
            _ort_compare(args, original, result.graph, stage, rows, data)
        elif data is not None:
            from graphopt.zoo.digits import evaluate

            rows["original"]["top1"] = evaluate(original.module, data.test)
            rows["optimized"]["top1"] = evaluate(result.graph.module, data.test)
        report = _run_report(args, pipeline, inputs, result, rows, time.perf_counter() - t0)
        write_json(stage / "report.json", report)
        written = [p.name + ("/" if p.is_dir() else "") for p in stage.iterdir()]
    _out(result.summary())
    _out()
    _out(_run_table(rows, data is not None, args.threads))
    if any(r.name == "distill" for r in result.reports) and (out / "distill").is_dir():
        written.append("distill/ (checkpoints)")
    _out(f"\nwrote {', '.join(sorted(written))} to {out}")
    return 0


def _save_module(graph, path: Path) -> None:
    """``torch.save`` the GraphModule (loadable with plain torch, without graphopt) and check
    that it reloads and computes the same outputs."""
    import copy

    from graphopt.metrics import within

    module = copy.deepcopy(graph.module)
    module._tracer_cls = None  # unpickling then re-traces with torch.fx.Tracer, not graphopt's
    torch.save(module, path)
    try:
        reloaded = torch.load(path, map_location="cpu", weights_only=False)
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
            "the reloaded model.pt computes different outputs than the optimized graph"
        )


def _ort_compare(args, original, optimized, stage: Path, rows: dict, data) -> None:
    """Export both graphs; record ORT latency, parity against the original torch model and,
    with data, top-1 accuracy, in ``rows``."""
    ort_backend = _ort()
    inputs = (data.test[0][0],) if data is not None else None
    with tempfile.TemporaryDirectory(prefix="graphopt-run-") as tmp:
        paths = {"original": Path(tmp) / "original.onnx", "optimized": stage / "model.onnx"}
        for name, graph in (("original", original), ("optimized", optimized)):
            log.info("exporting and timing the %s model in ONNX Runtime", name)
            with _quiet_stdout(args.verbose):
                ort_backend.export(graph, paths[name])
            rows[name]["parity"] = ort_backend.check_parity(original, paths[name], inputs=inputs)
            rows[name]["latency"] = ort_backend.benchmark(
                paths[name], threads=args.threads, runs=args.runs
            )
            if data is not None:
                from graphopt.zoo.digits import evaluate

                rows[name]["top1"] = evaluate(graph.module, data.test)
                rows[name]["top1_ort"] = _ort_top1(
                    ort_backend, paths[name], data.test, args.threads
                )


def _run_table(rows: dict, with_accuracy: bool, threads: int) -> str:
    latency = f"ORT ms (median, {threads} thread{'s' if threads > 1 else ''})"
    head = ["model", "params", "MACs", "bytes", latency, "parity (rel / cosine)"]
    if with_accuracy:
        head += ["top-1 (torch)", "top-1 (ORT)"]
    body = []
    for name, r in rows.items():
        cost = r["cost"]
        row = [
            name,
            _fmt_int(cost.params),
            _fmt_int(cost.macs),
            _fmt_int(cost.bytes),
            _fmt_ms(r.get("latency")),
            _fmt_parity(r.get("parity")),
        ]
        if with_accuracy:
            row += [_fmt_acc(r.get("top1")), _fmt_acc(r.get("top1_ort"))]
        body.append(row)
    return render(head, body)


def _run_report(args, pipeline, inputs, result, rows: dict, seconds: float) -> dict[str, Any]:
    from graphopt.distributed import world_size

    def row_json(r: dict) -> dict[str, Any]:
        d: dict[str, Any] = {"cost": r["cost"].to_dict()}
        for key in ("latency", "parity", "top1", "top1_ort"):
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


# -- argument parsing --------------------------------------------------------------------------
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _common() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more logging (-vv: debug)",
    )
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="digits:vgg, torchvision:NAME, pkg.mod:factory, file.py:factory or model.pt",
    )
    p.add_argument("--input-shape", metavar="SHAPE", help="example input shape, e.g. 1,3,224,224")
    p.add_argument(
        "--leaf",
        action="append",
        default=[],
        metavar="PATH",
        help="keep the module at PATH (fnmatch glob) opaque while tracing; repeatable",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a ratio in [0, 1), got {text!r}")
    return value


def _ratios(text: str) -> list[float]:
    return [_ratio(part.strip()) for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(
        prog=PROG,
        description="graphopt: compress a PyTorch model with a pipeline of graph passes.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", parents=[common], help="run a pipeline on a model and export it")
    _model_args(p)
    p.add_argument("--pipeline", required=True, metavar="TEXT", help="e.g. 'fold-bn,dce'")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="where model.pt, model.onnx, report.json go"
    )
    p.add_argument("--backend", choices=("ort", "none"), default="ort")
    p.add_argument("--data", metavar="NAME", help="named data set for passes and accuracy (digits)")
    p.add_argument(
        "--print-after",
        type=_names,
        action="extend",
        default=[],
        metavar="PASS",
        help="print the graph after PASS (comma-separated or repeated; 'all' for every pass)",
    )
    p.add_argument("--dump-dir", metavar="DIR", help="numbered graph dumps after each pass")
    p.add_argument("--threads", type=_positive_int, default=1, help="ORT threads for latency")
    p.add_argument(
        "--runs", type=_positive_int, default=30, help="timed runs per latency measurement"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sweep", parents=[common], help="accuracy against MACs and latency over prune ratios"
    )
    _model_args(p)
    p.add_argument("--data", required=True, metavar="NAME", help="named data set (digits)")
    p.add_argument(
        "--ratios",
        type=_ratios,
        default=[0.0, 0.25, 0.5, 0.75],
        metavar="R,R,...",
        help="prune ratios (default 0,0.25,0.5,0.75)",
    )
    p.add_argument(
        "--pipeline-template",
        default=SWEEP_TEMPLATE,
        metavar="TEXT",
        help="pipeline with {ratio} (default %(default)s)",
    )
    p.add_argument("--out", default="graphopt-sweep", metavar="DIR")
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--runs", type=_positive_int, default=50)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("emit-c", parents=[common], help="compile an ONNX model to C99 sources")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--name", default="model", help="C prefix and file stem (default model)")
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="static shape for an input with symbolic dimensions, e.g. input=1,3,32,32",
    )
    p.set_defaults(func=cmd_emit_c)

    p = sub.add_parser("passes", parents=[common], help="list every pass with its options")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("inspect", parents=[common], help="per-layer params, MACs and bytes")
    _model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", parents=[common], help="latency of an .onnx file or a model")
    _model_args(p)
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--runs", type=_positive_int, default=30)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", parents=[common], help=f"compress {DEMO_MODEL} and print the table")
    p.add_argument(
        "--out", default=DEMO_OUT, metavar="DIR", help=f"output directory (default ./{DEMO_OUT})"
    )
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--runs", type=_positive_int, default=200)
    p.add_argument("--ratio", type=_ratio, default=0.5, help="prune ratio (default %(default)s)")
    p.add_argument(
        "--epochs", type=_positive_int, default=30, help="distill epochs (default %(default)s)"
    )
    p.add_argument("--cc", metavar="CC", help="C compiler (default: $CC, cc, gcc or clang)")
    p.add_argument("--no-c", action="store_true", help="skip the C backend columns")
    p.set_defaults(func=cmd_demo)
    return parser


# -- entry point -------------------------------------------------------------------------------
def _one_line(message: str) -> str:
    """A multi-line message (e.g. a pipeline syntax error with a caret line) as one line."""
    parts = [line.strip() for line in message.strip().splitlines()]
    return " ".join(p for p in parts if p and set(p) != {"^"}) or "failed"


def _error(message: str) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        _error(str(e))
        return EXIT_USAGE
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    args.debug = getattr(args, "debug", False)
    args.verbose = getattr(args, "verbose", 0)
    with _logging(args.verbose):
        try:
            return args.func(args)
        except GraphoptError as e:
            if args.debug:
                traceback.print_exc()
            _error(str(e))
            return EXIT_USAGE
        except KeyboardInterrupt:
            _error("interrupted")
            return 130
        except BrokenPipeError:  # e.g. `graphopt passes | head`
            _silence_stdout()
            return EXIT_UNEXPECTED
        except Exception as e:
            if args.debug:
                traceback.print_exc()
            text = str(e).strip().splitlines()
            _error(
                f"unexpected {type(e).__name__}: {text[0] if text else ''} "
                "(rerun with --debug for the traceback)"
            )
            return EXIT_UNEXPECTED
