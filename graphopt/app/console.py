"""What the command line shows: output lines, progress bars, logs and error lines on stderr,
quiet stdout, and the exit statuses."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator

PROG = "graphopt"
EXIT_USAGE = 2
EXIT_UNEXPECTED = 1


class UsageError(Exception):
    """Bad command-line input: one line, exit status 2."""


# -- output and progress -----------------------------------------------------------------------
def echo(text: str = "") -> None:
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
def stderr_logging(verbose: int) -> Iterator[None]:
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
def quiet_stdout(verbose: int) -> Iterator[None]:
    """Keep third-party chatter (e.g. the ONNX exporter's progress lines) off stdout: send it
    to stderr with -v, discard it otherwise."""
    sink = sys.stderr if verbose else io.StringIO()
    with contextlib.redirect_stdout(sink):
        yield


# -- errors and exits --------------------------------------------------------------------------
def _one_line(message: str) -> str:
    """A multi-line message (e.g. a pipeline syntax error with a caret line) as one line."""
    parts = [line.strip() for line in message.strip().splitlines()]
    return " ".join(p for p in parts if p and set(p) != {"^"}) or "failed"


def error(message: str) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr, flush=True)


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
