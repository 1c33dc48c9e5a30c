"""What the commands load: a model from its spec, its trace, and a data set that must fit it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from graphopt.app.console import progress
from graphopt.errors import DataError

log = logging.getLogger(__name__)


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def load_spec(spec: str, input_shape: str | None):
    """The model and example inputs for a MODEL argument (downloads show a progress bar)."""
    from graphopt.zoo.models import load_model

    return load_model(spec, input_shape, progress=progress)


def trace_model(model, inputs, args):
    """Trace with the command's ``--leaf``, ``--frontend`` and ``--strict-trace``."""
    from graphopt.tracing import trace

    graph = trace(
        model,
        inputs,
        leaf_modules=tuple(args.leaf),
        frontend=getattr(args, "frontend", "auto"),
        strict=getattr(args, "strict_trace", False),
    )
    report = graph.trace_report
    for leaf in report.get("auto_leaves", ()):
        log.warning(
            "traced %s as a leaf (its channels stay locked): %s%s",
            leaf["module"],
            leaf["reason"],
            f" at {leaf['source']}" if leaf.get("source") else "",
        )
    if report.get("frontend") == "export":
        log.info("traced with torch.export (fx could not: %s)", "; ".join(report["fallbacks"]))
    return graph


def check_data_fits(data, inputs: tuple[torch.Tensor, ...]) -> None:
    want = tuple(inputs[0].shape[1:])
    if tuple(data.input_shape[1:]) != want:
        raise DataError(
            f"--data {data.name} gives inputs of shape {shape_text(data.input_shape[1:])} per "
            f"sample but the model takes {shape_text(want)}"
        )
