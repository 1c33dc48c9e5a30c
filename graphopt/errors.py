"""Typed errors. Every error graphopt raises on bad input derives from :class:`GraphoptError`
and carries a one-line message that names the node, module path, pass or option at fault and
says what to do; the CLI prints that line and exits non-zero."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class GraphoptError(Exception):
    """Base class for every error graphopt raises on purpose."""


class TraceError(GraphoptError):
    """The model could not be traced to a torch.fx graph."""

    def __init__(self, message: str, module_path: str | None = None, source: str | None = None):
        super().__init__(message)
        self.module_path = module_path
        self.source = source


class PipelineSyntaxError(GraphoptError):
    """The pipeline text does not parse."""


class UnknownPassError(GraphoptError):
    """A pipeline names a pass that is not registered."""


class OptionError(GraphoptError):
    """A pass option is unknown, has the wrong type or an invalid value."""


class PassContractError(GraphoptError):
    """A pass broke the pass contract (for example returned ``None`` instead of a PassResult)."""


class VerificationError(GraphoptError):
    """A pass left the graph invalid, or an exact pass changed the outputs."""

    def __init__(self, message: str, pass_name: str | None = None, node: str | None = None):
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node


class PassFailure(GraphoptError):
    """A pass raised. Wraps the original error with the pass name and the pipeline so far."""

    def __init__(self, message: str, pass_name: str, pipeline_so_far: str, reproducer=None):
        super().__init__(message)
        self.pass_name = pass_name
        self.pipeline_so_far = pipeline_so_far
        self.reproducer = reproducer


class ModelSpecError(GraphoptError):
    """A model specification (``torchvision:NAME``, ``pkg.mod:factory``, ...) cannot be loaded."""


class DataError(GraphoptError):
    """Data batches are missing or do not fit the model."""


class BackendError(GraphoptError):
    """Export or execution in a backend failed."""


class DistillError(GraphoptError):
    """Distillation cannot start or diverged (shapes differ, no teacher, NaN loss)."""
