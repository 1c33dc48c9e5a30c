"""The ``graphopt`` command line: the argument parser and :func:`main`, which runs a command
and turns its errors into exit statuses. Bad input exits with status 2 and one line on stderr
starting ``graphopt: error:`` (the traceback only with ``--debug``); an unexpected failure
exits with status 1 and a hint to rerun with ``--debug``.

The commands live in :mod:`.run` (``run``) and :mod:`.commands` (``passes``, ``inspect``,
``sweep``, ``bench``, ``emit-c``, ``demo``); what they print goes through :mod:`.console`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import traceback
from collections.abc import Iterator, Sequence

from graphopt import __version__
from graphopt.app import demo, sweep
from graphopt.app.commands import (
    cmd_bench,
    cmd_demo,
    cmd_emit_c,
    cmd_inspect,
    cmd_passes,
    cmd_sweep,
)
from graphopt.app.console import (
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    PROG,
    UsageError,
    error,
    silence_stdout,
    stderr_logging,
)
from graphopt.app.run import cmd_run
from graphopt.errors import GraphoptError


# -- argument parsing --------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


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


THREADS_HELP = "ONNX Runtime intra-op threads for latency (default: %(default)s)"
RUNS_HELP = "timed runs per latency measurement (default: %(default)s)"


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="digits:vgg, torchvision:NAME, hf:PATH (a save_pretrained folder), "
        "pkg.mod:factory, file.py:factory, model.pt2 (torch.export.save) or model.pt (with "
        "--trust-pickle)",
    )
    p.add_argument(
        "--input-shape",
        metavar="SHAPE",
        action=_InputShape,
        help="example input shape, e.g. 1,3,224,224 (default: the model's own, e.g. 1x1x8x8 "
        "for digits:vgg, 1x3x224x224 for most others)",
    )
    p.add_argument(
        "--input",
        action=_NamedInput,
        type=_named_input,
        default=[],
        metavar="NAME=DIMS[:DTYPE]",
        help="a named example input instead of --input-shape, repeatable, e.g. "
        "--input input_ids=1,128:int64 --input attention_mask=1,128:int64 (DTYPE: "
        "float32 (default), float16, int64, int32, bool)",
    )
    p.add_argument(
        "--leaf",
        action="append",
        default=[],
        metavar="PATH",
        help="keep the module at PATH (fnmatch glob) opaque while tracing; repeatable",
    )
    p.add_argument(
        "--frontend",
        choices=("auto", "fx", "concrete", "export"),
        default="auto",
        help="how the model is captured: fx, fx with concrete values, torch.export, or auto "
        "(in that order, then fx making untraceable submodules leaves; default: %(default)s)",
    )
    p.add_argument(
        "--strict-trace",
        action="store_true",
        help="refuse instead of making untraceable submodules leaves automatically",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a pickled MODEL.pt with full unpickling, which runs any code the file "
        "names: only for files you made or trust (default: tensors only; prefer .pt2 files "
        "from torch.export.save)",
    )


class _InputShape(argparse.Action):
    """``--input-shape``, given once and not with ``--input``."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(
                self, "give --input-shape once; for several inputs use --input NAME=DIMS"
            )
        if getattr(namespace, "input", None):
            raise argparse.ArgumentError(self, "give --input-shape or --input, not both")
        setattr(namespace, self.dest, values)


class _NamedInput(argparse.Action):
    """``--input NAME=DIMS[:DTYPE]``, repeatable, each name once, not with ``--input-shape``."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "input_shape", None) is not None:
            raise argparse.ArgumentError(self, "give --input-shape or --input, not both")
        given = list(getattr(namespace, self.dest, None) or [])
        if any(name == values[0] for name, _, _ in given):
            raise argparse.ArgumentError(self, f"input {values[0]!r} is given twice")
        setattr(namespace, self.dest, [*given, values])


def _named_input(text: str):
    from graphopt.zoo.models import parse_named_input

    try:
        return parse_named_input(text)
    except GraphoptError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    from graphopt.zoo.datasets import FORMS, TRANSFORMS

    p.add_argument("--data", required=required, metavar="DATA", help=f"data: {FORMS}")
    p.add_argument(
        "--transform",
        choices=TRANSFORMS,
        help="how an image folder is fitted to the model's input: resize (to HxW, pixels in "
        "[0, 1]; the default) or imagenet (resize 256, centre crop, ImageNet mean/std)",
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
    p.add_argument(
        "--pipeline",
        required=True,
        metavar="TEXT",
        help="passes to run, e.g. 'fold-bn,prune(ratio=0.5),qdq'; 'graphopt passes' lists "
        "them and 'graphopt passes NAME' shows one pass's options",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="directory for model.pt2, model.onnx, report.json (replaced as a whole when the "
        "run succeeds; a graphopt-manifest.json lists the run's files)",
    )
    p.add_argument(
        "--backend",
        choices=("ort", "none"),
        default="ort",
        help="ort: export model.onnx, check it against torch on several inputs and time it in "
        "ONNX Runtime; none: torch only (default: %(default)s)",
    )
    p.add_argument(
        "--allow-torchscript",
        action="store_true",
        help="if the torch.export-based ONNX exporter fails on a model with leaf modules, accept "
        "the TorchScript exporter, which freezes branches inside leaves on the example input",
    )
    _data_args(p)
    p.add_argument(
        "--print-after",
        type=_names,
        action="extend",
        default=[],
        metavar="PASS",
        help="print the graph after PASS (comma-separated or repeated; 'all' for every pass)",
    )
    p.add_argument(
        "--dump-dir",
        metavar="DIR",
        help="write numbered graph dumps after each pass (default: none)",
    )
    p.add_argument("--threads", type=_positive_int, default=1, help=THREADS_HELP)
    p.add_argument("--runs", type=_positive_int, default=30, help=RUNS_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sweep", parents=[common], help="accuracy against MACs and latency over prune ratios"
    )
    _model_args(p)
    _data_args(p, required=True)
    p.add_argument(
        "--ratios",
        type=_ratios,
        default=[0.0, 0.25, 0.5, 0.75],
        metavar="R,R,...",
        help="prune ratios (default 0,0.25,0.5,0.75)",
    )
    p.add_argument(
        "--pipeline-template",
        default=sweep.DEFAULT_TEMPLATE,
        metavar="TEXT",
        help="pipeline with {ratio} (default %(default)s)",
    )
    p.add_argument(
        "--out",
        default="graphopt-sweep",
        metavar="DIR",
        help="directory for sweep.csv and tradeoff.png (default: %(default)s)",
    )
    p.add_argument("--threads", type=_positive_int, default=1, help=THREADS_HELP)
    p.add_argument("--runs", type=_positive_int, default=50, help=RUNS_HELP)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("emit-c", parents=[common], help="compile an ONNX model to C99 sources")
    p.add_argument(
        "model", metavar="MODEL.onnx", help="the ONNX file to compile (float or QDQ int8)"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="directory for NAME.h, NAME.c, NAME_weights.c and report.json",
    )
    p.add_argument("--name", default="model", help="C prefix and file stem (default: %(default)s)")
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="static shape for an input with symbolic dimensions, e.g. input=1,3,32,32",
    )
    p.add_argument(
        "--patches",
        type=_positive_int,
        default=None,
        metavar="N",
        help="run the first stages on N x N spatial patches (less RAM, some recompute)",
    )
    p.add_argument(
        "--ram-budget",
        type=_positive_int,
        default=None,
        metavar="BYTES",
        help="choose patches and cut so that the arena fits in BYTES",
    )
    p.set_defaults(func=cmd_emit_c)

    p = sub.add_parser("passes", parents=[common], help="list every pass with its options")
    p.add_argument(
        "name", nargs="?", metavar="NAME", help="show only this pass (default: every pass)"
    )
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("inspect", parents=[common], help="per-layer params, MACs and bytes")
    _model_args(p)
    p.add_argument(
        "--quant-sensitivity",
        action="store_true",
        help="also quantize each layer alone (int8, qdq's defaults) and list its output SQNR, "
        "worst first, to choose qdq(skip=[...]); needs --data",
    )
    _data_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", parents=[common], help="latency of an .onnx file or a model")
    _model_args(p)
    p.add_argument("--threads", type=_positive_int, default=1, help=THREADS_HELP)
    p.add_argument("--runs", type=_positive_int, default=30, help=RUNS_HELP)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", parents=[common], help=f"compress {demo.MODEL} and print the table")
    p.add_argument(
        "--out", default=demo.OUT, metavar="DIR", help=f"output directory (default ./{demo.OUT})"
    )
    p.add_argument("--threads", type=_positive_int, default=1, help=THREADS_HELP)
    p.add_argument("--runs", type=_positive_int, default=200, help=RUNS_HELP)
    p.add_argument("--ratio", type=_ratio, default=0.5, help="prune ratio (default %(default)s)")
    p.add_argument(
        "--epochs", type=_positive_int, default=30, help="distill epochs (default %(default)s)"
    )
    p.add_argument("--cc", metavar="CC", help="C compiler (default: $CC, cc, gcc or clang)")
    p.add_argument("--no-c", action="store_true", help="skip the C backend columns")
    p.set_defaults(func=cmd_demo)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so staged outputs are cleaned up the same way."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        error(str(e))
        return EXIT_USAGE
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    args.debug = getattr(args, "debug", False)
    args.verbose = getattr(args, "verbose", 0)
    with stderr_logging(args.verbose), _sigterm_as_interrupt():
        try:
            return args.func(args)
        except GraphoptError as e:
            if args.debug:
                traceback.print_exc()
            error(str(e))
            return EXIT_USAGE
        except Terminated:
            error("terminated (SIGTERM); earlier outputs are intact")
            return 143
        except KeyboardInterrupt:
            error("interrupted")
            return 130
        except BrokenPipeError:  # e.g. `graphopt passes | head`
            silence_stdout()
            return EXIT_UNEXPECTED
        except Exception as e:
            if args.debug:
                traceback.print_exc()
            text = str(e).strip().splitlines()
            error(
                f"unexpected {type(e).__name__}: {text[0] if text else ''} "
                "(rerun with --debug for the traceback)"
            )
            return EXIT_UNEXPECTED
