"""Compile emitted C into a shared library and call it from Python (tests, parity checks)."""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import BackendError

from .emit import emit

log = logging.getLogger(__name__)

STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]


def compiler_version(cc: str) -> str:
    """The first line of ``cc --version`` (``?`` when it prints nothing), for reports."""
    out = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


def find_compiler(cc: str | None = None) -> str:
    """``cc``, else ``$CC``, else the first of cc/gcc/clang on PATH."""
    for cand in [cc] if cc else [os.environ.get("CC"), "cc", "gcc", "clang"]:
        if not cand:
            continue
        path = shutil.which(shlex.split(cand)[0])
        if path:
            return cand
        if cc:
            break
    raise BackendError(
        f"no C compiler found ({cc or 'tried $CC, cc, gcc, clang'}); install one "
        "(e.g. apt-get install gcc) or pass cc=/path/to/compiler"
    )


def compile_shared(
    sources: Sequence[Path],
    out: Path,
    cc: str | None = None,
    flags: Sequence[str] = ("-O2",),
    jobs: int = 2,
) -> float:
    """Compile ``sources`` (each to an object, in parallel) and link ``out``; returns seconds."""
    compiler = shlex.split(find_compiler(cc))
    t0 = time.perf_counter()
    objs = [out.parent / (Path(s).stem + ".o") for s in sources]

    def one(pair):
        src, obj = pair
        cmd = [*compiler, *STRICT, *flags, "-fPIC", "-c", str(src), "-o", str(obj)]
        return cmd, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(one, zip(sources, objs)))
    for cmd, r in results:
        if r.returncode:
            raise BackendError(f"C compiler failed on {cmd[-3]}:\n{r.stderr[-4000:]}")
    cmd = [*compiler, *flags, "-shared", "-o", str(out), *map(str, objs), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise BackendError(f"linking {out.name} failed:\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0


class CModel:
    """A compiled model: ``run(*arrays) -> list[np.ndarray]`` through ctypes."""

    def __init__(
        self,
        lib_path: Path,
        report: dict[str, Any],
        workdir: Any = None,
        compile_seconds: float = 0.0,
        lib: ctypes.CDLL | None = None,
    ):
        self.path = Path(lib_path)
        self.report = report
        self.name = report["name"]
        self.compile_seconds = compile_seconds
        self._workdir = workdir  # a TemporaryDirectory kept alive with the model
        self._lib = lib if lib is not None else ctypes.CDLL(str(self.path))
        fn = getattr(self._lib, f"{self.name}_run")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._fn = fn
        self.inputs = report["inputs"]
        self.outputs = report["outputs"]
        self._arena = np.zeros(self.arena_bytes + 64, np.uint8)

    @property
    def arena_bytes(self) -> int:
        return int(self.report["arena_bytes"])

    @property
    def arena_lower_bound_bytes(self) -> int:
        return int(self.report["arena_lower_bound_bytes"])

    @property
    def weight_bytes(self) -> int:
        return int(self.report["weight_bytes"])

    def _arena_ptr(self) -> int:
        base = self._arena.ctypes.data
        return base + (-base) % 64

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        if len(arrays) != len(self.inputs):
            raise BackendError(f"{self.name} takes {len(self.inputs)} inputs, got {len(arrays)}")
        ins = []
        for spec, a in zip(self.inputs, arrays):
            a = np.asarray(a)
            want = tuple(spec["shape"])
            if a.size != int(np.prod(want, dtype=np.int64)):
                raise BackendError(f"input {spec['name']!r} must have shape {want}, got {a.shape}")
            ins.append(np.ascontiguousarray(a, dtype=np.dtype(spec["dtype"])).reshape(want))
        outs = [np.zeros(o["shape"], np.dtype(o["dtype"])) for o in self.outputs]
        in_arr = (ctypes.c_void_p * max(1, len(ins)))(*[a.ctypes.data for a in ins])
        out_arr = (ctypes.c_void_p * max(1, len(outs)))(*[o.ctypes.data for o in outs])
        rc = self._fn(in_arr, out_arr, self._arena_ptr())
        if rc:
            raise BackendError(f"{self.name}_run returned error code {rc}")
        return outs

    __call__ = run

    def time_run(self, *arrays: np.ndarray, repeat: int = 20) -> list[float]:
        """Seconds per call of ``run`` on prepared buffers, ``repeat`` times."""
        ins = [
            np.ascontiguousarray(a, dtype=np.dtype(s["dtype"])) for s, a in zip(self.inputs, arrays)
        ]
        outs = [np.zeros(o["shape"], np.dtype(o["dtype"])) for o in self.outputs]
        in_arr = (ctypes.c_void_p * max(1, len(ins)))(*[a.ctypes.data for a in ins])
        out_arr = (ctypes.c_void_p * max(1, len(outs)))(*[o.ctypes.data for o in outs])
        arena = self._arena_ptr()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self._fn(in_arr, out_arr, arena)
            times.append(time.perf_counter() - t0)
        return times


def build(
    onnx_model_or_path,
    cc: str | None = None,
    flags: Sequence[str] = ("-O2",),
    name: str = "model",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    out_dir: str | os.PathLike | None = None,
    sparse: bool = True,
    patches: int | None = None,
    ram_budget: int | None = None,
) -> CModel:
    """Emit the model's C, compile it with ``cc`` into a shared library (in a temporary
    directory unless ``out_dir`` is given) and load it. ``sparse``, ``patches`` and
    ``ram_budget`` are :func:`~graphopt.backends.c.emit`'s.

    Raises :class:`~graphopt.errors.BackendError` when no compiler is found, the model is not
    supported, or the compiler rejects the code."""
    find_compiler(cc)
    out, tmp = _out_dir(out_dir)
    report = emit(
        onnx_model_or_path,
        out,
        name=name,
        input_shapes=input_shapes,
        sparse=sparse,
        patches=patches,
        ram_budget=ram_budget,
    )
    lib = out / f"lib{name}.so"
    secs = compile_shared([out / f"{name}.c", out / f"{name}_weights.c"], lib, cc, flags)
    log.info("compiled %s in %.1fs", lib, secs)
    return CModel(lib, report, tmp, secs)


def build_many(
    models: dict[str, Any],
    cc: str | None = None,
    flags: Sequence[str] = ("-O1",),
    out_dir: str | os.PathLike | None = None,
) -> dict[str, CModel | Exception]:
    """Emit several models (``{c_name: model}``) and compile them into ONE shared library.

    Returns ``{c_name: CModel}``, or the exception for a model that could not be emitted. If
    the joint compile fails, each model is compiled alone so the culprits get the error and
    the rest still load. Used by the tests to keep hundreds of small models fast."""
    find_compiler(cc)
    out, tmp = _out_dir(out_dir)
    results: dict[str, CModel | Exception] = {}
    reports: dict[str, dict] = {}
    for name, model in models.items():
        try:
            reports[name] = emit(model, out / name, name=name)
        except Exception as e:  # noqa: BLE001 - reported per model
            results[name] = e
    if not reports:
        return results

    def sources(names):
        return [p for n in names for p in (out / n / f"{n}.c", out / n / f"{n}_weights.c")]

    lib = out / "libmodels.so"
    try:
        secs = _compile_one_call(sources(reports), lib, cc, flags)
        handle = ctypes.CDLL(str(lib))
        for name, rep in reports.items():
            results[name] = CModel(lib, rep, tmp, secs, lib=handle)
    except BackendError:
        for name, rep in reports.items():
            one = out / name / f"lib{name}.so"
            try:
                secs = _compile_one_call(sources([name]), one, cc, flags)
                results[name] = CModel(one, rep, tmp, secs)
            except BackendError as e:
                results[name] = e
    return results


def _out_dir(out_dir) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """``out_dir``, or a new temporary directory (returned too: the models keep it alive)."""
    if out_dir is not None:
        return Path(out_dir), None
    tmp = tempfile.TemporaryDirectory(prefix="graphopt-c-")
    return Path(tmp.name), tmp


def _compile_one_call(
    sources: Sequence[Path], out: Path, cc: str | None, flags: Sequence[str]
) -> float:
    """One compiler process for all ``sources`` (cheaper than one per file for tiny ones)."""
    compiler = shlex.split(find_compiler(cc))
    t0 = time.perf_counter()
    cmd = [
        *compiler,
        *STRICT,
        *flags,
        "-fPIC",
        "-shared",
        "-o",
        str(out),
        *map(str, sources),
        "-lm",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise BackendError(f"C compiler failed:\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0
