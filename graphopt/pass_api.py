"""The pass contract.

A pass is a class with a registered ``name``, an ``Options`` dataclass, a flag saying whether
it is **exact** (outputs unchanged within float tolerance) or lossy, and
``run(graph, ctx) -> PassResult``. It rewrites the Graph it is given in place; the manager owns
that Graph, so the user's model is never touched. An option whose field metadata holds
``"pipeline": True`` is a nested pipeline text (prune's ``between``): the manager checks it when
the pipeline is parsed and the pass runs it with :meth:`PassContext.run_nested`. The manager
records each pass as a :class:`PassReport`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .options import NoOptions

if TYPE_CHECKING:
    from .graph import Graph

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass returns: whether it changed the graph, and a JSON-able report.

    ``report["summary"]``, when present, is the one-line description shown in tables.
    """

    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


def _no_progress(iterable: Iterable, desc: str = "", total: int | None = None) -> Iterable:
    return iterable


@dataclass
class PassContext:
    """What the manager hands every pass.

    Attributes:
        data: a re-iterable of batches (tensors or ``(inputs, labels)`` tuples), or ``None``.
        teacher: the Graph as it was traced (copied lazily on first use), for distillation.
        out_dir: where a pass may write artefacts (e.g. a pruning plan), or ``None``.
        checkpoint_dir: where training passes keep checkpoints that must survive a failed run
            (default: ``out_dir``).
        progress: ``progress(iterable, desc, total)`` wraps long loops; the CLI shows a bar.
        seed: the seed passes use for anything random.
        nested: set by the manager: ``nested(text, graph)`` runs a pipeline text on ``graph``
            with this context's data, teacher and progress (see :meth:`run_nested`).
    """

    data: Any = None
    teacher_factory: Callable[[], Graph] | None = None
    out_dir: Path | None = None
    checkpoint_dir: Path | None = None
    progress: Callable[..., Iterable] = _no_progress
    seed: int = 0
    nested: Callable[[str, Graph], Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def teacher(self) -> Graph | None:
        """The graph as it was traced (copied on first use), or the teacher given to run()."""
        if "teacher" not in self.extras and self.teacher_factory is not None:
            self.extras["teacher"] = self.teacher_factory()
        return self.extras.get("teacher")

    def run_nested(self, text: str, graph: Graph) -> Any:
        """Run the pipeline ``text`` on ``graph`` in place (no verification: the enclosing pass
        is verified as a whole) and return its ``PipelineResult``."""
        if self.nested is None:
            raise RuntimeError(
                "this PassContext runs no nested pipelines: only the pass manager can give one"
            )
        return self.nested(text, graph)

    def batches(self) -> Iterator[tuple[Any, Any]]:
        """Iterate ``(inputs_tuple, labels_or_None)`` over ``data``."""
        from .data import iter_batches

        return iter_batches(self.data)


class Pass:
    """Base class of every pass. Subclasses set ``name``, ``exact``, ``Options`` and ``run``."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions
    needs_data: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False  # the manager then snapshots the graph before pass 1

    def __init__(self, options: Any = None):
        if options is None:
            options = self.Options()
        if not isinstance(options, self.Options):
            raise TypeError(f"{self.name}: options must be {self.Options.__name__}")
        self.options = options

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def uses_teacher(cls, options: Any) -> bool:
        """Whether this pass, with these options, reads ``ctx.teacher``."""
        return cls.needs_teacher

    @classmethod
    def uses_data(cls, options: Any) -> bool:
        """Whether this pass, with these options, cannot run without ``ctx.data``."""
        return cls.needs_data

    @classmethod
    def trains(cls, options: Any) -> bool:
        """Whether this pass, with these options, trains the weights (fine-tuning, distilling)."""
        return False

    @classmethod
    def needs_training_after(cls, options: Any) -> str | None:
        """Why this pass, with these options, has no effect unless a later pass trains (the
        manager warns when none does), else ``None``."""
        return None

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __repr__(self) -> str:
        return f"<pass {self.name} {dataclasses.asdict(self.options)}>"


@dataclass
class PassReport:
    index: int
    name: str
    spec: str
    exact: bool
    modified: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)
    drift_total: dict[str, float] = field(default_factory=dict)
    params: int = 0
    verified: bool = False
    check_seconds: float = 0.0  # the manager's structure check and verification after the pass

    @property
    def summary(self) -> str:
        return str(self.details.get("summary", ""))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def nested_pipelines(options: Any) -> list[tuple[str, str]]:
    """``(field name, pipeline text)`` of every nested-pipeline option that is set."""
    return [
        (f.name, getattr(options, f.name))
        for f in dataclasses.fields(options)
        if f.metadata.get("pipeline") and getattr(options, f.name)
    ]


def function_pass(
    fn: Callable[..., PassResult],
    name: str,
    exact: bool,
    options: type = NoOptions,
) -> type[Pass]:
    """Wrap ``fn(graph, ctx, options) -> PassResult`` into a :class:`Pass` subclass."""

    def run(self: Pass, graph: Graph, ctx: PassContext) -> PassResult:
        return fn(graph, ctx, self.options)

    cls = type(
        f"FunctionPass_{name.replace('-', '_')}",
        (Pass,),
        {
            "name": name,
            "exact": exact,
            "Options": options,
            "run": run,
            "__doc__": fn.__doc__,
            "__module__": fn.__module__,
        },
    )
    return cls
