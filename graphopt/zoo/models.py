"""Model specifications, as the CLI takes them (data sets: :mod:`graphopt.zoo.datasets`).

``load_model(spec)`` accepts:

* ``digits:vgg``: the bundled digits CNN (trained and cached on first use), input 1x1x8x8;
* ``torchvision:NAME``: a torchvision model with random weights (nothing is downloaded);
* ``pkg.module:factory``: an importable callable returning an ``nn.Module``;
* ``path/to/file.py:factory``: the same, from a Python file;
* ``path/to/model.pt2``: a ``torch.export`` program (``torch.export.save``; graphopt's own
  output), loaded without unpickling anything;
* ``path/to/model.pt``: a whole ``nn.Module`` saved with ``torch.save(model, path)``; only with
  ``trust_pickle=True`` (CLI ``--trust-pickle``), since unpickling runs code from the file;
* ``hf:PATH``: a Hugging Face transformers model saved with ``save_pretrained`` in the local
  folder ``PATH`` (config + safetensors; nothing is downloaded). Its example input is what the
  config says it reads: token ids ``(1, 32)`` for text models, ``pixel_values`` for vision
  models, ``input_values`` for audio ones, log-mel ``input_features`` for Whisper-style
  encoders (``--input-shape`` changes the shape). Of an encoder-decoder model (Whisper, T5)
  the encoder is compressed, with a warning: generation runs the decoder step by step.

``named_inputs`` (CLI: ``--input NAME=DIMS[:DTYPE]``, repeatable) replaces the single example
input by keyword inputs, e.g. ``input_ids=1,128:int64`` and ``attention_mask=1,128:int64``.

Every failure raises :class:`~graphopt.errors.ModelSpecError` with one line saying what is
wrong and what to do.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import logging
import pickle
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from graphopt.errors import DataError, ModelSpecError

log = logging.getLogger(__name__)

DEFAULT_SHAPE = (1, 3, 224, 224)
SPEC_FORMS = "digits:vgg, torchvision:NAME, hf:PATH, pkg.module:factory, path/file.py:factory, path/model.pt2, path/model.pt"
_TORCHVISION_SHAPES = {"inception_v3": (1, 3, 299, 299)}
_VIDEO_SHAPE = (1, 3, 16, 112, 112)
_MODULE_FILE_SUFFIXES = (".pt", ".pth")
PROGRAM_SUFFIX = ".pt2"  # a torch.export program (graphopt.program): no pickle
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
NamedInput = tuple[str, tuple[int, ...], torch.dtype]


def parse_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    if not isinstance(text, str):
        return tuple(int(d) for d in text)
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise DataError(f"input shape {text!r} is not a comma-separated list of integers") from None
    if not shape or any(d <= 0 for d in shape):
        raise DataError(f"input shape {text!r} must be positive integers, e.g. 1,3,224,224")
    return shape


def parse_named_input(text: str) -> NamedInput:
    """``"mask=1,128:int64"`` -> ``("mask", (1, 128), torch.int64)``; the dtype defaults to
    float32."""
    name, eq, rest = text.partition("=")
    name = name.strip()
    if not eq or not name.isidentifier():
        raise DataError(f"input {text!r}: expected NAME=DIMS[:DTYPE], e.g. mask=1,128:int64")
    dims, _, dtype = rest.partition(":")
    dtype = dtype.strip() or "float32"
    if dtype not in DTYPES:
        raise DataError(f"input {text!r}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return name, parse_shape(dims), DTYPES[dtype]


def named_example_inputs(
    specs: Sequence[NamedInput], seed: int = 0, token_ids: int | None = None, token_input: str = ""
) -> dict[str, torch.Tensor]:
    """Random keyword inputs from a fixed seed: normal floats, random bools, ids in
    ``[0, token_ids)`` for the input named ``token_input`` and in ``[0, 2)`` for other integer
    inputs (masks, token types)."""
    names = [name for name, _, _ in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"input {twice[0]!r} is given twice; give each input once")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape, dtype in specs:
        if dtype.is_floating_point:
            out[name] = torch.randn(*shape, generator=gen).to(dtype)
        elif dtype == torch.bool:
            out[name] = torch.randint(0, 2, tuple(shape), generator=gen).bool()
        else:
            high = token_ids if token_ids and name == token_input else 2
            out[name] = torch.randint(0, high, tuple(shape), generator=gen, dtype=dtype)
    return out


def example_inputs(
    shape: Sequence[int], seed: int = 0, token_ids: int | None = None
) -> tuple[torch.Tensor]:
    """One random input of ``shape`` from a fixed seed: normal floats, or token ids in
    ``[0, token_ids)`` when that is given."""
    gen = torch.Generator().manual_seed(seed)
    if token_ids is not None:
        return (torch.randint(0, token_ids, tuple(shape), generator=gen),)
    return (torch.randn(*shape, generator=gen),)


def load_model(
    spec: str,
    input_shape: str | Sequence[int] | None = None,
    progress: Callable | None = None,
    *,
    named_inputs: Sequence[str | NamedInput] | None = None,
    trust_pickle: bool = False,
) -> tuple[nn.Module, tuple[torch.Tensor, ...] | dict[str, torch.Tensor]]:
    """``(model in eval mode, example inputs)`` for a model spec (see the module docstring).

    ``input_shape`` overrides the spec's default input shape. ``named_inputs`` (``"NAME=DIMS"``
    texts or parsed triples) gives keyword inputs instead: the example inputs are then a dict.
    ``progress`` wraps training loops (only ``digits:vgg`` trains, on first use).
    ``trust_pickle`` lets a ``.pt``/``.pth`` file be fully unpickled (which runs code the file
    names); without it only tensors load, and a pickled module is refused with what to do.
    """
    if named_inputs and input_shape is not None:
        raise DataError("give either an input shape or named inputs, not both")
    spec = spec.strip()
    vocab = None
    if spec.startswith("hf:"):
        model, shape, vocab = _hugging_face(Path(spec.split(":", 1)[1]))
    else:
        model, shape = _resolve(spec, progress, trust_pickle)
    if named_inputs:
        specs = [parse_named_input(t) if isinstance(t, str) else t for t in named_inputs]
        main = getattr(model, "main_input_name", "")
        return model.eval(), named_example_inputs(specs, token_ids=vocab, token_input=main)
    if input_shape is not None:
        shape = parse_shape(input_shape)
    return model.eval(), example_inputs(shape, token_ids=vocab)


def _resolve(
    spec: str, progress: Callable | None, trust_pickle: bool = False
) -> tuple[nn.Module, tuple[int, ...]]:
    spec = spec.strip()
    if spec.startswith("digits:"):
        return _digits(spec.split(":", 1)[1], progress), (1, 1, 8, 8)
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1])
    if spec.endswith(PROGRAM_SUFFIX):
        from graphopt.program import load_program

        return load_program(spec), DEFAULT_SHAPE
    if spec.endswith(_MODULE_FILE_SUFFIXES):
        return _saved_module(Path(spec), trust_pickle), DEFAULT_SHAPE
    if ":" in spec:
        where, factory = spec.rsplit(":", 1)
        if where.endswith(".py"):
            return _call_factory(spec, import_file(Path(where)), factory), DEFAULT_SHAPE
        if where and all(p.isidentifier() for p in where.split(".")):
            return _call_factory(spec, import_module(where), factory), DEFAULT_SHAPE
    if spec.endswith(".py"):
        raise ModelSpecError(f"model spec {spec!r} names a file but no factory; write {spec}:NAME")
    raise ModelSpecError(f"cannot understand model spec {spec!r}; use one of: {SPEC_FORMS}")


def _digits(name: str, progress: Callable | None) -> nn.Module:
    if name != "vgg":
        raise ModelSpecError(f"unknown digits model {name!r}; the bundled one is digits:vgg")
    from graphopt.zoo.digits import pretrained_vgg

    return pretrained_vgg(progress=progress)


def _torchvision(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    try:
        import torchvision
    except ImportError:
        raise ModelSpecError(
            "torchvision:NAME needs torchvision: pip install torchvision"
        ) from None
    names = torchvision.models.list_models()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean 'torchvision:{near[0]}'?" if near else ""
        raise ModelSpecError(f"unknown torchvision model {name!r}{hint}")
    kwargs: dict[str, Any] = {}
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # scipy truncated-normal init is slow and pointless here
    video = name in torchvision.models.list_models(module=torchvision.models.video)
    shape = _VIDEO_SHAPE if video else _TORCHVISION_SHAPES.get(name, DEFAULT_SHAPE)
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception as e:
        raise ModelSpecError(f"torchvision:{name} failed to build: {type(e).__name__}: {e}") from e
    return model, shape


def _hugging_face(path: Path) -> tuple[nn.Module, tuple[int, ...], int | None]:
    """``AutoModel.from_pretrained(path)`` from a local folder, offline; its input shape; and
    the vocabulary size when it reads token ids."""
    if not (path / "config.json").is_file():
        raise ModelSpecError(
            f"hf:{path} is not a saved transformers model: no config.json there (save one with "
            "model.save_pretrained(PATH))"
        )
    try:
        import transformers
    except ImportError:
        raise ModelSpecError("hf:PATH needs transformers: pip install transformers") from None
    try:
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ModelSpecError(
            f"hf:{path} failed to load: {type(e).__name__}: {_first_line(e)}"
        ) from e
    cfg = model.config
    if getattr(cfg, "use_cache", None):
        cfg.use_cache = False  # a compressed model runs whole sequences: no key/value cache
    if getattr(cfg, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        # a sequence-to-sequence model (Whisper, T5, ...) generates token by token; what
        # compresses as one graph is its encoder, which reads the model's main input
        log.warning(
            "hf:%s is an encoder-decoder model (%s); compressing its encoder",
            path,
            type(model).__name__,
        )
        main = model.main_input_name
        model = model.get_encoder()
        model.main_input_name = getattr(model, "main_input_name", main)
    name = model.main_input_name
    if name == "input_ids":
        return model, (1, 32), int(cfg.vocab_size)
    if name == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        return model, (1, int(getattr(cfg, "num_channels", 3)), size, size), None
    if name == "input_values":
        return model, (1, 16000), None
    if name == "input_features":  # log-mel frames; Whisper's encoder wants exactly 2 x positions
        frames = 2 * int(getattr(cfg, "max_source_positions", 1500))
        return model, (1, int(getattr(cfg, "num_mel_bins", 80)), frames), None
    raise ModelSpecError(f"hf:{path}: graphopt does not know how to feed {name!r} inputs yet")


def _saved_module(path: Path, trust_pickle: bool = False) -> nn.Module:
    """A whole module saved with ``torch.save``. Without ``trust_pickle`` only tensors are
    unpickled (``weights_only=True``), so a pickled module is refused before any code in the
    file can run."""
    if not path.is_file():
        raise ModelSpecError(f"model file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise ModelSpecError(f"cannot unpickle {str(path)!r}: {_first_line(e)}") from e
        raise ModelSpecError(
            f"{str(path)!r} is a pickled Python object, and unpickling it runs whatever code the "
            "file names, so graphopt read only its tensors and stopped. If you made this file "
            "or trust it, pass --trust-pickle (Python: trust_pickle=True; distill: trust-pickle=true). "
            "Safer: save the model "
            "with torch.export.save(torch.export.export(model, args), 'model.pt2') and give the "
            ".pt2, or give a factory that builds it and loads a state_dict (file.py:make)"
        ) from None
    except Exception as e:
        raise ModelSpecError(
            f"cannot load {str(path)!r}: {type(e).__name__}: {_first_line(e)}"
        ) from e
    if isinstance(obj, torch.jit.ScriptModule):
        raise ModelSpecError(
            f"{str(path)!r} holds TorchScript, which cannot be traced; save the nn.Module itself "
            "with torch.save(model, path) or use a factory (file.py:make)"
        )
    if isinstance(obj, dict):
        raise ModelSpecError(
            f"{str(path)!r} holds a state_dict, not a model: a .pt must hold a whole module "
            "(torch.save(model, path)), or give a factory that builds it and loads the weights "
            "(file.py:make)"
        )
    if not isinstance(obj, nn.Module):
        raise ModelSpecError(f"{str(path)!r} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def import_file(path: Path) -> Any:
    """The Python file at ``path`` imported as a module (once per resolved path)."""
    if not path.is_file():
        raise ModelSpecError(f"model file {str(path)!r} does not exist")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"graphopt_user_{resolved.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so pickling (model.pt) can find the module's classes
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ModelSpecError(
            f"importing {str(path)!r} failed: {type(e).__name__}: {_first_line(e)}"
        ) from e
    return module


def import_module(name: str) -> Any:
    """``importlib.import_module`` with one-line :class:`ModelSpecError` messages."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise ModelSpecError(
                f"cannot import module {name!r}: no module named {e.name!r} "
                "(is it installed, or on PYTHONPATH?)"
            ) from e
        raise ModelSpecError(f"importing {name!r} failed: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise ModelSpecError(
            f"importing {name!r} failed: {type(e).__name__}: {_first_line(e)}"
        ) from e


def _call_factory(spec: str, module: Any, factory: str) -> nn.Module:
    obj = getattr(module, factory, None) if factory.isidentifier() else None
    if obj is None:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        near = difflib.get_close_matches(factory, public, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ModelSpecError(f"{spec}: {module.__name__!r} has no factory {factory!r}{hint}")
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelSpecError(f"{spec}: {factory!r} is a {type(obj).__name__}, not a callable")
    try:
        model = obj()
    except Exception as e:
        raise ModelSpecError(
            f"{spec}: the factory raised {type(e).__name__}: {_first_line(e)}"
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{spec}: the factory returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"
