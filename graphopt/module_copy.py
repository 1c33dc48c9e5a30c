"""A deep copy of a module tree, equal to ``copy.deepcopy`` and about twice as fast.

``copy.deepcopy`` copies an ``nn.Module`` through the generic pickle protocol: it deep-copies
every entry of the module's ``__dict__`` one by one, the ten or so empty hook dictionaries and
the plain settings (``stride``, ``eps``, ...) included, each through the generic dispatch.
:func:`copy_module` copies a module whose class keeps ``nn.Module``'s own copy protocol by
hand: children recursively, parameters and buffers with ``copy.deepcopy`` (their own
``__deepcopy__``), empty hook dictionaries and sets as new empty ones, immutable settings
shared, and everything else with ``copy.deepcopy``; every module and tensor goes through one
``memo``, so shared submodules and tied parameters stay shared in the copy, as
``copy.deepcopy`` keeps them. The new module gets that state through its class's
``__setstate__``, as ``copy.deepcopy`` gives it (convolutions and attention override it to
default settings older pickles lack). A module whose class copies itself differently (its own
``__deepcopy__``, ``__reduce_ex__``, ``__getstate__`` or ``__slots__``: ``fx.GraphModule``,
the RNNs) is handed to ``copy.deepcopy`` with the same memo.

:class:`DeferredParameters` lets the parameters' data be cloned on a background thread while
the caller reads the copy (tracing), which hides most of the copy's time on a second core.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any, TypeVar

import torch
import torch.nn as nn

M = TypeVar("M", bound=nn.Module)

_ATOMIC = frozenset(
    (type(None), bool, int, float, complex, str, bytes, type, torch.dtype, torch.device)
)
_PROTOCOL = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__")
_plain_class: dict[type, bool] = {}
_DEFERRED = "graphopt.deferred"
"""The memo key of a copy's :class:`DeferredParameters` (memo keys are otherwise ids)."""
_STORAGES = "graphopt.storages"
"""The memo key of the buffers cloned directly, by data pointer (see :func:`_buffer`)."""


def copy_module(
    module: M, memo: dict[int, Any] | None = None, deferred: DeferredParameters | None = None
) -> M:
    """A deep copy of ``module``, as ``copy.deepcopy(module, memo)`` makes it. With
    ``deferred``, the copy's parameters alias the source's storage until
    :meth:`DeferredParameters.finish` gives them their own (see there)."""
    memo = {} if memo is None else memo
    if deferred is not None:
        memo[_DEFERRED] = deferred
    try:
        return _copy(module, memo)
    finally:
        memo.pop(_DEFERRED, None)


class DeferredParameters:
    """The parameters of a copy, cloned on a background thread while the caller works.

    :func:`copy_module` gives the copy new ``nn.Parameter`` objects that share the source's
    storage; :meth:`start` clones the source's data on a thread (torch
    releases the GIL while it copies, so tracing runs beside it on another core); :meth:`finish`
    waits and points every copy's parameter at its clone (``param.data = clone``: the same
    ``Parameter`` objects, so graphs built over the copy keep them). Until then the copy must
    only be *read*: :meth:`finish` refuses, naming the parameter, if anything wrote into one
    in place (a version counter moved: the source was written too). Buffers, which forwards
    do write (batch-norm statistics, caches), are copied at once as before. Copying BERT-base's
    440 MB of weights takes about 0.2 s, most of it first-touch page faults."""

    def __init__(self) -> None:
        self._pairs: list[tuple[nn.Parameter, nn.Parameter, int, int]] = []
        self._sources: list[torch.Tensor] = []
        self._clones: dict[int, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def alias(self, p: nn.Parameter) -> nn.Parameter:
        """A new parameter sharing ``p``'s storage, with its own version counter (through
        ``.data``: swapping the storage later must not move the counter of ``p``)."""
        a = nn.Parameter(p.data, requires_grad=p.requires_grad)
        self._pairs.append((a, p, a._version, p._version))
        return a

    def start(self, model: nn.Module) -> None:
        """Start cloning, on a thread, the parameters :func:`copy_module` aliases in ``model``
        (called before the copy, the clones run beside the copy too)."""
        self._sources = _aliased_parameters(model)
        # The thread makes one torch call, so it needs the GIL only to start and end: every
        # torch call releases the GIL, and a thread that wants it back while the caller runs
        # Python waits a switch interval (5 ms) each time. The clones are allocated here,
        # untouched (no page faults yet), in about a millisecond.
        clones = [torch.empty_like(p, requires_grad=False) for p in self._sources]
        self._thread = threading.Thread(
            target=self._clone, args=(clones, self._sources), name="graphopt-copy", daemon=True
        )
        self._thread.start()

    def _clone(self, clones: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        try:
            with torch.no_grad():
                torch._foreach_copy_(clones, sources)
            self._clones = {id(p): c for p, c in zip(self._sources, clones)}
        except BaseException as e:  # pragma: no cover - out of memory
            self._error = e

    def wait(self) -> None:
        """Wait for the clones (the copy is being dropped, or about to be finished)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def finish(self, root: nn.Module) -> None:
        """Give ``root`` (the copy) its parameters' own storage."""
        self.wait()
        clones = self._clones if self._error is None else {}
        for a, p, version, source_version in self._pairs:
            if a._version != version or p._version != source_version:
                where = next((n for n, q in root.named_parameters() if q is a), "?")
                raise RuntimeError(
                    f"parameter {where!r} was written in place while the model was traced "
                    "(its forward modifies its own weights); graphopt cannot take such a model"
                )
            c = clones.get(id(p))
            if c is None:  # the thread failed, or the parameter was not foreseen: clone here
                with torch.no_grad():
                    c = p.detach().clone()
            a.data = c
        self._pairs, self._sources, self._clones = [], [], {}


def _aliased_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters :func:`copy_module` aliases: plain ``nn.Parameter`` objects of modules
    it copies by hand (not those under a module handed to ``copy.deepcopy``), each once."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen or not _plain(type(m)):
            continue
        seen.add(id(m))
        for p in m._parameters.values():
            if type(p) is nn.Parameter and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        stack += [c for c in m._modules.values() if c is not None]
    return out


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
        elif k == "_parameters" and t is dict and _DEFERRED in memo:
            state[k] = {n: _param(p, memo) for n, p in v.items()}
        elif k == "_buffers" and t is dict:
            state[k] = {n: None if b is None else _buffer(b, memo) for n, b in v.items()}
        elif k == "_parameters" and t is dict:
            state[k] = {n: None if p is None else copy.deepcopy(p, memo) for n, p in v.items()}
        elif t is OrderedDict and not v:
            state[k] = OrderedDict()
        elif t is set and not v:
            state[k] = set()
        elif t is tuple and all(type(e) in _ATOMIC for e in v):
            state[k] = v
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__setstate__(state)
    return new


def _buffer(b: torch.Tensor, memo: dict[Any, Any]) -> torch.Tensor:
    """``copy.deepcopy(b, memo)``; a plain dense tensor that fills its own storage is cloned
    directly (``Tensor.__deepcopy__`` costs ~25 µs of Python per tensor, and keeps two storage
    objects per tensor alive in the memo: batch-norm statistics are three per layer).

    Views stay views: the clones are listed by data pointer (``memo[_STORAGES]``), and a
    buffer that ``copy.deepcopy`` copies (a view) finds its base's clone there, entered in the
    memo where ``Tensor.__deepcopy__`` looks for copied storages; a base whose view came first
    goes to ``copy.deepcopy`` too, which shares the view's copy."""
    done = memo.get(id(b))
    if done is not None:
        return done
    if type(b) is not torch.Tensor or b.layout is not torch.strided or b.device.type != "cpu":
        return copy.deepcopy(b, memo)
    copied = memo.setdefault(_STORAGES, {})
    if (
        b.numel() > 0
        and not b.requires_grad
        and b.grad is None
        and not b.is_quantized
        and not b.is_conj()
        and not b.is_neg()
        and b.storage_offset() == 0
        and b.is_contiguous()
        and not b.__dict__
        and b.data_ptr() not in copied
        and b.untyped_storage().nbytes() == b.numel() * b.element_size()
    ):
        new = memo[id(b)] = copied[b.data_ptr()] = b.clone()
        return new
    storage = b.untyped_storage()
    base = copied.get(storage.data_ptr())
    if base is not None:  # a view of a buffer cloned above: share its clone's storage
        memo.setdefault("torch", {})[storage._cdata] = base.untyped_storage()
    new = copy.deepcopy(b, memo)
    copied.setdefault(storage.data_ptr(), None)  # copied by deepcopy: no direct clone
    return new


def _param(p: nn.Parameter | None, memo: dict[Any, Any]) -> nn.Parameter | None:
    if p is None:
        return None
    done = memo.get(id(p))
    if done is not None:
        return done
    if type(p) is not nn.Parameter:  # a subclass (lazy, quantized): copied at once
        return copy.deepcopy(p, memo)
    a = memo[id(p)] = memo[_DEFERRED].alias(p)
    return a
