"""Files saved by graphopt 0.1 name classes by the old flat module names; they still load."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

import graphopt  # noqa: F401  (installs the old names)
from graphopt.compat import OLD_NAMES
from graphopt.quant.modules import QuantConv
from graphopt.zoo.digits import DigitsVGG


def _saved_under_old_name(obj, cls, old_module: str) -> bytes:
    """Pickle ``obj`` as graphopt 0.1 did: its class named from ``old_module``."""
    new_module = cls.__module__
    cls.__module__ = old_module
    try:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()
    finally:
        cls.__module__ = new_module


@pytest.mark.parametrize(
    ("cls", "old", "make"),
    [
        (
            QuantConv,
            "graphopt.quant_modules",
            lambda: QuantConv(
                torch.randn(4, 3, 3, 3),
                torch.randn(4),
                torch.full((4,), 0.01),
                0.02,
                2,
                (1, 1),
                (1, 1),
                (1, 1),
                1,
            ),
        ),
        (DigitsVGG, "graphopt.digits", lambda: DigitsVGG()),
    ],
)
def test_old_pickles_load(cls, old, make):
    obj = make().eval()
    data = _saved_under_old_name(obj, cls, old)
    assert old.encode() in data  # the file really names the old module
    loaded = torch.load(io.BytesIO(data), weights_only=False)
    assert type(loaded) is cls
    x = torch.rand(1, 3, 8, 8) if cls is QuantConv else torch.rand(1, 1, 8, 8)
    assert torch.equal(loaded(x), obj(x))


def test_every_old_name_resolves():
    import importlib

    for old, new in OLD_NAMES.items():
        alias, real = importlib.import_module(old), importlib.import_module(new)
        public = [n for n in vars(real) if not n.startswith("_")]
        assert public and all(getattr(alias, n) is getattr(real, n) for n in public), old


def test_plain_pickle_of_an_old_name():
    data = pickle.dumps(QuantConv).replace(b"graphopt.quant.modules", b"graphopt.quant_modules")
    assert pickle.loads(data) is QuantConv
