"""A deep copy of a module tree, equal to ``copy.deepcopy`` and about twice as fast.

``copy.deepcopy`` copies an ``nn.Module`` through the generic pickle protocol: it deep-copies
every entry of the module's ``__dict__`` one by one, the ten or so empty hook dictionaries and
the plain settings (``stride``, ``eps``, ...) included, each through the generic dispatch.
:func:`copy_module` copies a module whose class keeps ``nn.Module``'s own copy protocol by
hand: children recursively, parameters and buffers with ``copy.deepcopy`` (their own
``__deepcopy__``), empty hook dictionaries as new empty ones, immutable settings shared, and
everything else with ``copy.deepcopy``; every module and tensor goes through one ``memo``, so
shared submodules and tied parameters stay shared in the copy, as ``copy.deepcopy`` keeps them.
A module whose class copies itself differently (its own ``__deepcopy__``, ``__reduce_ex__``,
``__getstate__``, ``__setstate__`` or ``__slots__``: ``fx.GraphModule``, the RNNs) is handed to
``copy.deepcopy`` with the same memo.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, TypeVar

import torch
import torch.nn as nn

M = TypeVar("M", bound=nn.Module)

_ATOMIC = frozenset(
    (type(None), bool, int, float, complex, str, bytes, type, torch.dtype, torch.device)
)
_PROTOCOL = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__")
_plain_class: dict[type, bool] = {}


def copy_module(module: M, memo: dict[int, Any] | None = None) -> M:
    """A deep copy of ``module``, as ``copy.deepcopy(module, memo)`` makes it."""
    return _copy(module, {} if memo is None else memo)


def _plain(cls: type) -> bool:
    """Whether ``cls`` copies like ``nn.Module``: ``__dict__`` state, no protocol overrides."""
    ok = _plain_class.get(cls)
    if ok is None:
        ok = all(
            getattr(cls, k, None) is getattr(nn.Module, k, None) for k in _PROTOCOL
        ) and not any("__slots__" in vars(c) for c in cls.__mro__[:-1])
        _plain_class[cls] = ok
    return ok


def _copy(m: nn.Module, memo: dict[int, Any]) -> Any:
    done = memo.get(id(m))
    if done is not None:
        return done
    cls = type(m)
    if not _plain(cls):
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    state: dict[str, Any] = {}
    for k, v in m.__dict__.items():
        t = type(v)
        if t in _ATOMIC:
            state[k] = v
        elif k == "_modules" and t is dict:
            state[k] = {n: None if c is None else _copy(c, memo) for n, c in v.items()}
        elif (k == "_parameters" or k == "_buffers") and t is dict:
            state[k] = {n: None if p is None else copy.deepcopy(p, memo) for n, p in v.items()}
        elif t is OrderedDict and not v:
            state[k] = OrderedDict()
        elif t is tuple and all(type(e) in _ATOMIC for e in v):
            state[k] = v
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__setstate__(state)
    return new
