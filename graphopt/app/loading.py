"""What the commands load: a model from its spec, its trace, and a data set that must fit it."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from graphopt.app.console import progress
from graphopt.errors import DataError

log = logging.getLogger(__name__)


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def inputs_text(inputs: Any) -> str:
    """``1x3x8x8``, or ``ids 1x128, mask 1x128`` for named inputs."""
    if isinstance(inputs, dict):
        return ", ".join(f"{k} {shape_text(v.shape)}" for k, v in inputs.items())
    return ", ".join(shape_text(t.shape) for t in inputs)


def load_spec(
    spec: str,
    input_shape: str | None,
    named_inputs: Sequence | None = None,
    trust_pickle: bool = False,
):
    """The model and example inputs for a MODEL argument (downloads show a progress bar);
    ``named_inputs`` (``--input``) makes the example inputs a dict; ``trust_pickle``
    (``--trust-pickle``) allows fully unpickling a ``.pt`` model."""
    from graphopt.zoo.models import load_model

    return load_model(
        spec,
        input_shape,
        progress=progress,
        named_inputs=named_inputs or None,
        trust_pickle=trust_pickle,
    )


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
    if report.get("frontend") in ("concrete", "export"):
        log.info(
            "traced with the %s front end (before it: %s)",
            report["frontend"],
            "; ".join(report["fallbacks"]),
        )
    return graph


def input_names(model: torch.nn.Module, inputs: Any) -> list[str]:
    """The example inputs' names in ``forward``'s order (the order the traced graph and the
    data batches take them in); a name that is not a parameter of ``forward`` is refused."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    named = [p.name for p in params if p.kind in (*kinds, inspect.Parameter.KEYWORD_ONLY)]
    if isinstance(inputs, dict):
        unknown = [k for k in inputs if k not in named]
        if unknown and not any(p.kind == p.VAR_KEYWORD for p in params):
            raise DataError(
                f"example input {unknown[0]!r} is not a parameter of {type(model).__name__}"
                f".forward; its parameters are: {', '.join(named)}"
            )
        return [n for n in named if n in inputs] + unknown
    positional = [p.name for p in params if p.kind in kinds]
    if len(positional) >= len(inputs):
        return positional[: len(inputs)]
    return [f"input_{i}" if i else "input" for i in range(len(inputs))]


def load_cli_data(args, model: torch.nn.Module, inputs: Any):
    """The command's ``--data`` (with ``--transform``) for ``model``, checked against its
    example inputs; ``None`` without ``--data``."""
    if not getattr(args, "data", None):
        if getattr(args, "transform", None):
            raise DataError("--transform needs --data naming an image folder")
        return None
    from graphopt.zoo.datasets import load_data

    names = input_names(model, inputs)
    tensors = [inputs[n] for n in names] if isinstance(inputs, dict) else list(inputs)
    data = load_data(
        args.data,
        input_shape=tuple(tensors[0].shape),
        input_names=names,
        transform=getattr(args, "transform", None),
    )
    check_data_fits(data, tensors, names)
    return data


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "integer"


def check_data_fits(
    data, inputs: Sequence[torch.Tensor], names: Sequence[str] | None = None
) -> None:
    """Refuse data whose samples do not fit the example inputs: their number, each one's shape
    per sample, and integer (token ids) against float."""
    names = list(names or [f"input {i}" for i in range(len(inputs))])
    shapes, dtypes = data.sample_shapes, data.dtypes
    if len(shapes) != len(inputs):
        raise DataError(
            f"--data {data.name} gives {len(shapes)} input(s) per sample but the model takes "
            f"{len(inputs)} ({', '.join(names)}); give one tensor per input, in that order"
        )
    for i, (name, t) in enumerate(zip(names, inputs)):
        what = "inputs" if len(inputs) == 1 else f"input {name!r}"
        want = tuple(t.shape[1:])
        if tuple(shapes[i]) != want:
            raise DataError(
                f"--data {data.name} gives {what} of shape {shape_text(shapes[i])} per sample "
                f"but the model takes {shape_text(want)}"
            )
        if i < len(dtypes) and _kind(dtypes[i]) != _kind(t.dtype):
            raise DataError(
                f"--data {data.name} gives {what} as {_kind(dtypes[i])} ({dtypes[i]}) but the "
                f"model takes {_kind(t.dtype)} ({t.dtype}); convert the data, or give the "
                "input's dtype with --input NAME=DIMS:DTYPE"
            )


def top1(module, batches) -> float:
    """Top-1 accuracy of ``module`` over ``(inputs, labels)`` batches (inputs a tensor or a
    tuple, passed positionally)."""
    from graphopt.zoo.digits import evaluate

    was_training = module.training
    module.eval()
    try:
        return evaluate(
            lambda x: module(*x) if isinstance(x, (list, tuple)) else module(x), batches
        )
    finally:
        module.train(was_training)
