"""Instruments see every pass (the TVM PassInstrument idea): ``before_pass``, ``after_pass``
and ``on_failure``. Shipped: timing, printing the graph after named passes, numbered dumps."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import write_text

if TYPE_CHECKING:
    from .graph import Graph
    from .pass_api import Pass, PassReport

log = logging.getLogger(__name__)


class Instrument:
    """Base class; override any hook."""

    def before_pass(self, p: Pass, graph: Graph, index: int) -> None:
        pass

    def after_pass(self, p: Pass, graph: Graph, report: PassReport) -> None:
        pass

    def on_failure(self, p: Pass, graph: Graph, index: int, error: BaseException) -> None:
        pass


class Timing(Instrument):
    """Wall time of each pass, in ``timings`` as ``(index, name, seconds)``."""

    def __init__(self) -> None:
        self.timings: list[tuple[int, str, float]] = []
        self._t0 = 0.0

    def before_pass(self, p, graph, index):
        self._t0 = time.perf_counter()

    def after_pass(self, p, graph, report):
        self.timings.append((report.index, p.name, time.perf_counter() - self._t0))


def graph_text(graph: Graph) -> str:
    """Readable text of a Graph: one line per node with op, target, shape and module path."""
    from .graph import node_meta

    lines = []
    for n in graph.module.graph.nodes:
        m = node_meta(n)
        shape = "x".join(map(str, m.shape)) if m.shape is not None else "-"
        target = (
            n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        )
        args = ", ".join(str(a) for a in n.args)
        lines.append(
            f"%{n.name} = {n.op}[{target}]({args})  # {shape} {m.module_path or ''}".rstrip()
        )
    return "\n".join(lines) + "\n"


class PrintAfter(Instrument):
    """Emit the graph text after every pass whose name is in ``names`` ("all" for every pass).

    ``sink`` receives the text; by default it is written to standard error (the caller asked
    to see it, so it must not depend on logging being configured).
    """

    def __init__(self, names: Iterable[str], sink: Callable[[str], None] | None = None):
        self.names = set(names)
        self.sink = sink or _to_stderr

    def after_pass(self, p, graph, report):
        if "all" in self.names or p.name in self.names:
            self.sink(f"// graph after {report.index:02d}-{p.name}\n{graph_text(graph)}")


def _to_stderr(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


class DumpDir(Instrument):
    """Write ``NN-name.txt`` (node table) and ``NN-name.py`` (generated code) after each pass,
    and on failure a reproducer (``reproducer/``: graph before the pass, inputs, pipeline)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.reproducer: Path | None = None

    def before_pass(self, p, graph, index):
        if index == 0:
            write_text(self.dir / "00-input.txt", graph_text(graph))

    def after_pass(self, p, graph, report):
        stem = f"{report.index:02d}-{p.name}"
        write_text(self.dir / f"{stem}.txt", graph_text(graph))
        write_text(self.dir / f"{stem}.py", graph.module.code)

    def on_failure(self, p, graph, index, error):
        pass  # the manager writes the reproducer with the pre-pass graph it kept
