"""Data sets as the CLI takes them (``--data``).

``load_data(spec)`` accepts:

* ``digits``: the bundled scikit-learn digits split (1x8x8 images, 10 classes);
* ``PATH.pt`` / ``.pth``: read with ``torch.load(weights_only=True)``, so nothing but tensors
  and plain containers is ever unpickled. It holds a tensor ``[N, ...]`` of inputs; a pair
  ``(inputs, labels)``; a dict ``{"inputs": x, "labels": y}`` (labels optional; ``inputs`` a
  tuple of tensors for a model with several inputs); or a list of batches, each a tensor, a
  tuple of tensors or an ``(inputs, labels)`` pair;
* ``PATH.npy``: one array of inputs ``[N, ...]``; ``PATH.npz``: arrays ``inputs`` (or ``x``) and
  optional ``labels`` (or ``y``), or one array per model input named after it (read with
  ``allow_pickle=False``);
* a folder with one sub-folder of images per class (torchvision ``ImageFolder``), fitted to
  the model's ``C x H x W`` input by a ``transform`` preset: ``resize`` (the default: resize to
  ``H x W``, pixels in ``[0, 1]``) or ``imagenet`` (short side to 256, centre crop, ImageNet
  mean and std); grayscale for one channel. Labels are the sorted sub-folders' indices;
* ``file.py:factory`` or ``pkg.module:factory``: called with no arguments, it returns batches
  (a DataLoader, a list, a generator; read into memory once) or any of the ``.pt`` forms;
  a batch may also be a dict keyed by the model's input names (and ``labels``).

Labels are 1-D integer class indices, one per sample. With labels, the last 20% of the samples
(at least one; an image folder: a fixed random 20%) are held out as ``test``, where accuracy is
measured, and the rest is ``train``, which the passes read. Without labels everything is
``train`` and accuracy is not measured. Float64 inputs are read as float32.

Every failure raises :class:`~graphopt.errors.DataError` with one line naming the source and
saying what to do.
"""

from __future__ import annotations

import difflib
import logging
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.data import split_batch
from graphopt.errors import DataError, ModelSpecError, first_line

log = logging.getLogger(__name__)

TEST_FRACTION = 0.2
TRANSFORMS = ("resize", "imagenet")
FORMS = "a named set (digits), a .pt/.npy/.npz file, an image folder, or file.py:factory"
_TORCH_SUFFIXES = (".pt", ".pth")
_NUMPY_SUFFIXES = (".npy", ".npz")
_INPUT_KEYS = ("inputs", "x")
_LABEL_KEYS = ("labels", "y")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

Inputs = tuple[torch.Tensor, ...]


@dataclass
class NamedData:
    """Batches as the CLI uses them: ``train`` feeds the pipeline (calibration, importance,
    training), ``test`` measures accuracy and is empty without labels. Both re-iterate
    ``(inputs, labels)`` pairs (bare inputs in an unlabelled ``train``), ``inputs`` being a
    tensor or, for several model inputs, a tuple. ``sample_shapes`` and ``dtypes`` describe
    each input of one sample; ``name`` is the source."""

    name: str
    train: Any
    test: Any
    sample_shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def has_test(self) -> bool:
        return self.test is not None and len(self.test) > 0


def _digits() -> NamedData:
    from graphopt.zoo.digits import INPUT_SHAPE, load_digits_data

    data = load_digits_data()
    shapes = (tuple(INPUT_SHAPE[1:]),)
    return NamedData(
        "digits", data.batches("train"), data.batches("test"), shapes, (torch.float32,)
    )


DATASETS: dict[str, Callable[[], NamedData]] = {"digits": _digits}


def load_data(
    spec: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    input_names: Sequence[str] | None = None,
    batch_size: int = 32,
    transform: str | None = None,
) -> NamedData:
    """The data set ``spec`` names (see the module docstring).

    ``input_shape`` is the model's (first) input shape, which an image folder is resized to;
    ``input_names`` are the model's inputs in ``forward``'s order, which name the arrays of a
    multi-input ``.npz`` and the keys of dict batches. ``transform`` is an image-folder preset.
    """
    spec = str(spec).strip()
    names = list(input_names or ())
    if transform is not None and transform not in TRANSFORMS:
        raise DataError(f"unknown transform {transform!r}; use one of {', '.join(TRANSFORMS)}")
    path = Path(spec)
    if transform is not None and not path.is_dir():
        raise DataError(f"--transform applies to image folders; --data {spec} is not a folder")
    if spec in DATASETS:
        data = DATASETS[spec]()
    elif _is_factory(spec):
        data = _from_object(spec, _call_factory(spec), names, batch_size)
    elif path.is_dir():
        data = _image_folder(path, input_shape, transform or "resize", batch_size)
    elif path.suffix.lower() in _TORCH_SUFFIXES + _NUMPY_SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file {spec!r} does not exist")
        if path.suffix.lower() in _TORCH_SUFFIXES:
            data = _from_object(spec, _read_torch(path), names, batch_size)
        else:
            data = _from_object(spec, _read_numpy(path), names, batch_size)
    elif path.is_file():
        raise DataError(
            f"--data {spec}: unknown file type {path.suffix or '(none)'!r}; give {FORMS}"
        )
    else:
        near = difflib.get_close_matches(spec, list(DATASETS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise DataError(
            f"unknown data set {spec!r}{hint} (no such file or folder either; known sets: "
            f"{', '.join(sorted(DATASETS))}; or give {FORMS})"
        )
    log.info(
        "data %s: %d train and %d test batches%s",
        data.name,
        len(data.train),
        len(data.test),
        "" if data.has_test else " (no labels: accuracy is not measured)",
    )
    return data


# -- readers -----------------------------------------------------------------------------------
def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (a {found.group(1)})" if found else ""
        raise DataError(
            f"{str(path)!r} holds objects other than tensors{what}, which graphopt does not "
            "unpickle; save tensors only: torch.save({'inputs': x, 'labels': y}, path) or a "
            "list of tensors"
        ) from None
    except Exception as e:
        raise DataError(
            f"cannot read {str(path)!r} as a torch.save file: {type(e).__name__}: {first_line(e)}"
        ) from e


def _read_numpy(path: Path) -> Any:
    hint = "save numeric arrays: np.save(path, x) or np.savez(path, inputs=x, labels=y)"
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return _tensor(str(path), "the array", loaded)
        with loaded:
            return {k: _tensor(str(path), f"array {k!r}", loaded[k]) for k in loaded.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{str(path)!r} holds Python objects, not numbers; {hint}") from None
        raise DataError(f"cannot read {str(path)!r}: {first_line(e)}; {hint}") from e
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {str(path)!r}: {type(e).__name__}: {first_line(e)}") from e


def _tensor(source: str, what: str, array: np.ndarray) -> torch.Tensor:
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError:
        raise DataError(
            f"{source}: {what} has dtype {array.dtype}, which is not a number type; give "
            "float or integer arrays"
        ) from None


def _is_factory(spec: str) -> bool:
    where, sep, name = spec.rpartition(":")
    if not sep or not name.isidentifier():
        return False
    return where.endswith(".py") or bool(where) and all(p.isidentifier() for p in where.split("."))


def _call_factory(spec: str) -> Any:
    from graphopt.zoo.models import import_file, import_module

    where, _, name = spec.rpartition(":")
    if where.endswith(".py") and not Path(where).is_file():
        raise DataError(f"--data {spec}: the file {where!r} does not exist")
    try:
        module = import_file(Path(where)) if where.endswith(".py") else import_module(where)
    except ModelSpecError as e:
        raise DataError(f"--data {spec}: {e}") from e
    fn = getattr(module, name, None)
    if fn is None:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        near = difflib.get_close_matches(name, public, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise DataError(f"--data {spec}: {where!r} has no factory {name!r}{hint}")
    if not callable(fn):
        raise DataError(f"--data {spec}: {name!r} is a {type(fn).__name__}, not a function")
    try:
        return fn()
    except Exception as e:
        raise DataError(
            f"--data {spec}: the factory raised {type(e).__name__}: {first_line(e)}"
        ) from e


# -- forms -------------------------------------------------------------------------------------
def _from_object(source: str, obj: Any, names: list[str], batch_size: int) -> NamedData:
    """A tensor, an ``(inputs, labels)`` pair, a dict of arrays, or batches."""
    if isinstance(obj, torch.Tensor):
        return _from_tensors(source, (obj,), None, batch_size)
    if isinstance(obj, dict):
        return _from_tensors(source, *_from_mapping(source, obj, names), batch_size)
    pair = _as_pair(obj)
    if pair is not None:
        return _from_tensors(source, *pair, batch_size)
    if isinstance(obj, (str, bytes)) or not hasattr(obj, "__iter__"):
        raise DataError(
            f"--data {source} gives a {type(obj).__name__}; give a tensor, (inputs, labels), "
            "a dict with 'inputs' and 'labels', or an iterable of batches"
        )
    try:
        items = list(obj)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"--data {source}: reading the batches failed: {type(e).__name__}: {first_line(e)}"
        ) from e
    return _from_batches(source, items, names, batch_size)


def _as_pair(obj: Any) -> tuple[Inputs, torch.Tensor] | None:
    """``(inputs, labels)`` when ``obj`` is one pair of whole-data tensors, else ``None``."""
    if not (isinstance(obj, (list, tuple)) and len(obj) == 2):
        return None
    x, y = obj
    inputs = (x,) if isinstance(x, torch.Tensor) else x
    if not (
        isinstance(inputs, (list, tuple))
        and inputs
        and all(isinstance(t, torch.Tensor) and t.dim() for t in inputs)
        and _is_labels(y)
        and all(t.shape[0] == len(y) for t in inputs)
        and not (isinstance(x, torch.Tensor) and x.dim() == 1)
    ):
        return None
    return tuple(inputs), y


def _is_labels(y: Any) -> bool:
    return (
        isinstance(y, torch.Tensor)
        and y.dim() == 1
        and not y.is_floating_point()
        and y.dtype != torch.bool
    )


def _from_mapping(
    source: str, mapping: dict, names: list[str]
) -> tuple[Inputs, torch.Tensor | None]:
    """Inputs and labels from arrays keyed ``inputs``/``x`` and ``labels``/``y``, or named after
    the model's inputs."""
    keys = [str(k) for k in mapping]
    label_keys = [k for k in _LABEL_KEYS if k in mapping]
    input_keys = [k for k in _INPUT_KEYS if k in mapping]
    if len(label_keys) > 1 or len(input_keys) > 1:
        raise DataError(f"--data {source} has {keys}: give one of 'inputs'/'x' and 'labels'/'y'")
    if input_keys:
        value = mapping[input_keys[0]]
        inputs = (value,) if isinstance(value, torch.Tensor) else value
        used = input_keys + label_keys
    elif names and all(n in mapping for n in names):
        inputs = tuple(mapping[n] for n in names)
        used = names + label_keys
    else:
        named = f", or one per model input ({', '.join(names)})" if names else ""
        raise DataError(
            f"--data {source} has {keys or 'nothing'}; give 'inputs' (or 'x'){named} and "
            "optionally 'labels' (or 'y')"
        )
    extra = [k for k in keys if k not in used]
    if extra:
        raise DataError(
            f"--data {source}: unexpected {extra}; give 'inputs' (or one per model input) and "
            "'labels' only"
        )
    if not (
        isinstance(inputs, (list, tuple))
        and inputs
        and all(isinstance(t, torch.Tensor) for t in inputs)
    ):
        raise DataError(f"--data {source}: the inputs must be a tensor or a tuple of tensors")
    return tuple(inputs), mapping[label_keys[0]] if label_keys else None


def _from_tensors(
    source: str, inputs: Inputs, labels: torch.Tensor | None, batch_size: int
) -> NamedData:
    """Whole-data tensors ``[N, ...]`` cut into batches; the last 20% held out with labels."""
    inputs = tuple(_float32(t) for t in inputs)
    n = _check_samples(f"--data {source}", inputs, labels)
    n_test = _n_test(n) if labels is not None else 0
    cut = n - n_test

    def batches(lo: int, hi: int) -> list:
        return [
            _batch(
                tuple(t[i : min(i + batch_size, hi)] for t in inputs),
                None if labels is None else labels[i : min(i + batch_size, hi)],
            )
            for i in range(lo, hi, batch_size)
        ]

    return NamedData(
        source,
        batches(0, cut),
        batches(cut, n),
        tuple(tuple(t.shape[1:]) for t in inputs),
        tuple(t.dtype for t in inputs),
    )


def _from_batches(source: str, items: list, names: list[str], batch_size: int) -> NamedData:
    """A list of batches, checked alike; the last 20% of them held out with labels."""
    if not items:
        raise DataError(f"--data {source} holds no batches: give at least one batch of inputs")
    parts = [_split(source, i, item, names) for i, item in enumerate(items)]
    if len({y is None for _, y in parts}) > 1:
        raise DataError(
            f"--data {source}: some batches have labels and others do not; label all or none"
        )
    if len(parts) == 1:  # one big batch: cut it like whole-data tensors
        return _from_tensors(source, parts[0][0], parts[0][1], batch_size)
    first = parts[0][0]
    for i, (x, y) in enumerate(parts):
        where = f"--data {source}: batch {i}"
        _check_samples(where, x, y)
        if [t.shape[1:] for t in x] != [t.shape[1:] for t in first]:
            raise DataError(
                f"{where} has inputs of shape {_shapes(x)} per sample but batch 0 "
                f"{_shapes(first)}; every batch must hold the same kind of samples"
            )
    batches = [_batch(x, y) for x, y in parts]
    n_test = _n_test(len(batches)) if parts[0][1] is not None else 0
    cut = len(batches) - n_test
    return NamedData(
        source,
        batches[:cut],
        batches[cut:],
        tuple(tuple(t.shape[1:]) for t in first),
        tuple(t.dtype for t in first),
    )


def _split(source: str, i: int, item: Any, names: list[str]) -> tuple[Inputs, torch.Tensor | None]:
    if isinstance(item, dict):
        missing = [n for n in names if n not in item]
        if not names or missing:
            raise DataError(
                f"--data {source}: batch {i} is a dict with keys {list(item)}; it must hold the "
                f"model's inputs ({', '.join(names) or 'unknown'}) and optionally 'labels'"
            )
        labels = next((item[k] for k in ("labels", "label") if k in item), None)
        return tuple(_float32(item[n]) for n in names), labels
    try:
        x, y = split_batch(item)
    except DataError as e:
        raise DataError(f"--data {source}: batch {i}: {e}") from None
    return tuple(_float32(t) for t in x), y


def _batch(x: Inputs, y: torch.Tensor | None) -> Any:
    inputs = x[0] if len(x) == 1 else x
    return inputs if y is None else (inputs, y)


def _n_test(n: int) -> int:
    """How many of ``n`` samples (or batches) to hold out: 20%, at least one, none of one."""
    if n < 2:
        log.warning("data: too little to hold out a test split; accuracy is not measured")
        return 0
    return max(1, round(TEST_FRACTION * n))


def _float32(t: Any) -> Any:
    return t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.float64 else t


def _shapes(x: Inputs) -> str:
    return ", ".join("x".join(str(d) for d in t.shape[1:]) or "scalar" for t in x)


def _check_samples(where: str, inputs: Inputs, labels: torch.Tensor | None) -> int:
    """The number of samples; refuses empty inputs, NaN/Inf and labels that do not match."""
    for k, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            raise DataError(f"{where}: input {k} is not a tensor of samples [N, ...]")
    n = inputs[0].shape[0]
    if n == 0:
        raise DataError(f"{where} holds no samples (its first dimension is 0)")
    for k, t in enumerate(inputs):
        if t.shape[0] != n:
            raise DataError(
                f"{where}: input {k} has {t.shape[0]} samples but input 0 has {n}; give the same "
                "number of samples for every input"
            )
        if t.is_floating_point():
            bad = ~torch.isfinite(t.reshape(n, -1)).all(dim=1)
            if bool(bad.any()):
                raise DataError(
                    f"{where}: input {k} holds NaN or Inf (first in sample "
                    f"{int(bad.nonzero()[0])}); remove or replace those samples"
                )
    if labels is not None:
        if not _is_labels(labels):
            kind = f"{tuple(labels.shape)} {labels.dtype}" if torch.is_tensor(labels) else labels
            raise DataError(
                f"{where}: labels must be a 1-D tensor of integer class indices, got {kind}"
            )
        if len(labels) != n:
            raise DataError(
                f"{where}: {len(labels)} labels for {n} samples; give one label per sample"
            )
    return n


# -- image folders -----------------------------------------------------------------------------
def _image_folder(
    path: Path, input_shape: Sequence[int] | None, transform: str, batch_size: int
) -> NamedData:
    """torchvision's ImageFolder fitted to the model's image input, loaded batch by batch."""
    try:
        from torch.utils.data import DataLoader, Subset
        from torchvision import datasets
        from torchvision.transforms import v2
    except ImportError:
        raise DataError(
            f"--data {path}: an image folder needs torchvision: pip install torchvision"
        ) from None
    shape = tuple(input_shape or ())
    if len(shape) != 4 or shape[1] not in (1, 3):
        got = "x".join(map(str, shape)) or "unknown"
        raise DataError(
            f"--data {path} is an image folder but the model's input is {got}, not images "
            "(N x 1 or 3 x H x W); give --input-shape, or a .pt/.npz file"
        )
    channels, h, w = shape[1:]
    steps: list[Any] = [v2.Grayscale(1)] if channels == 1 else []
    if transform == "imagenet":
        steps += [v2.Resize(round(256 * max(h, w) / 224)), v2.CenterCrop((h, w))]
    else:
        steps.append(v2.Resize((h, w)))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if transform == "imagenet":
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        if channels == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        steps.append(v2.Normalize(list(mean), list(std)))
    try:
        folder = datasets.ImageFolder(str(path), transform=v2.Compose(steps))
    except (OSError, RuntimeError, ValueError) as e:
        raise DataError(
            f"--data {path}: {first_line(e)}; an image folder holds one sub-folder of images per "
            "class (DIR/cat/1.png)"
        ) from None
    n = len(folder)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    n_test = _n_test(n)
    train_idx, test_idx = sorted(order[: n - n_test]), sorted(order[n - n_test :])
    train = DataLoader(Subset(folder, train_idx), batch_size=batch_size)
    test = DataLoader(Subset(folder, test_idx), batch_size=batch_size) if test_idx else []
    log.info(
        "data %s: %d images of %d classes (%s), transform %s",
        path,
        n,
        len(folder.classes),
        ", ".join(folder.classes[:5]) + (", ..." if len(folder.classes) > 5 else ""),
        transform,
    )
    return NamedData(str(path), train, test, ((channels, h, w),), (torch.float32,))
