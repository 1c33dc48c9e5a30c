"""What the commands load: a model from its spec, its trace, and a data set that must fit it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graphopt.app.console import progress
from graphopt.errors import DataError


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def load_spec(spec: str, input_shape: str | None):
    """The model and example inputs for a MODEL argument (downloads show a progress bar)."""
    from graphopt.zoo.models import load_model

    return load_model(spec, input_shape, progress=progress)


def trace_model(model, inputs, leaves: Sequence[str] = ()):
    from graphopt.tracing import trace

    return trace(model, inputs, leaf_modules=tuple(leaves))


def check_data_fits(data, inputs: tuple[torch.Tensor, ...]) -> None:
    want = tuple(inputs[0].shape[1:])
    if tuple(data.input_shape[1:]) != want:
        raise DataError(
            f"--data {data.name} gives inputs of shape {shape_text(data.input_shape[1:])} per "
            f"sample but the model takes {shape_text(want)}"
        )
