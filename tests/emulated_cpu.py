"""ONNX Runtime on an emulated x86 CPU (qemu-user), for tests and benchmarks.

ORT's int8 kernels (MLAS) pick their code path from CPUID, so an int8 model can be exact on
this machine (VNNI) and wrong on a CPU with AVX2 but no VNNI (see :mod:`graphopt.cpu`).
``qemu-x86_64-static -cpu EPYC-Rome`` runs this machine's Python and ORT as on a Zen 2 CPU:
AVX2, no AVX-512, no VNNI. ORT's graph optimisations run in the emulated process too, so the
CPU-dependent rewrites ORT makes there are the ones that CPU gets.

Only numpy and onnxruntime are imported in the emulated process (torch takes ~20 s to import
under qemu). Arrays travel through ``.npz`` files in a temporary directory; the worker is this
file run as a script. ``/proc/cpuinfo`` inside qemu-user is still the host's, so
``graphopt.cpu`` there would read the host's flags: pass ``qdq(target=avx2)`` explicitly.

qemu is looked up in ``$GRAPHOPT_QEMU``, ``PATH``, ``.venv/qemu/usr/bin`` under the repository
and ``/tmp/qemu/root/usr/bin`` (``apt-get download qemu-user-static && dpkg -x *.deb DIR``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
QEMU_NAME = "qemu-x86_64-static"
DEFAULT_CPU = "EPYC-Rome"
_CANDIDATES = (ROOT / ".venv/qemu/usr/bin" / QEMU_NAME, Path("/tmp/qemu/root/usr/bin") / QEMU_NAME)
_NOISE = "TCG doesn't support requested feature"


class EmulationError(RuntimeError):
    """qemu is missing, or ORT failed in the emulated process."""


def find_qemu() -> Path | None:
    """The qemu-x86_64-static binary, or ``None`` (only on an x86-64 host)."""
    if os.uname().machine != "x86_64":
        return None
    env = os.environ.get("GRAPHOPT_QEMU")
    if env:
        return Path(env) if os.access(env, os.X_OK) else None
    found = shutil.which(QEMU_NAME)
    if found:
        return Path(found)
    return next((p for p in _CANDIDATES if os.access(p, os.X_OK)), None)


def _qemu() -> Path:
    qemu = find_qemu()
    if qemu is None:
        where = ", ".join(["$GRAPHOPT_QEMU", "PATH", *map(str, _CANDIDATES)])
        raise EmulationError(
            f"{QEMU_NAME} not found (looked in {where}); get it with "
            "`apt-get download qemu-user-static && dpkg -x qemu-user-static_*.deb DIR`"
        )
    return qemu


def _call(job: dict, cpu: str, tmp: Path, timeout: float) -> dict:
    (tmp / "job.json").write_text(json.dumps(job))
    cmd = [str(_qemu()), "-cpu", cpu, sys.executable, str(Path(__file__).resolve()), str(tmp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise EmulationError(f"emulated ORT ({cpu}) timed out after {timeout:.0f}s") from e
    err = "\n".join(ln for ln in proc.stderr.splitlines() if _NOISE not in ln)
    if proc.returncode != 0 or not (tmp / "done.json").is_file():
        tail = "\n".join(err.splitlines()[-15:]) or "(no stderr)"
        raise EmulationError(
            f"emulated ORT ({cpu}) failed with exit code {proc.returncode}:\n{tail}"
        )
    if err:
        log.debug("emulated ORT stderr: %s", err)
    return json.loads((tmp / "done.json").read_text())


def run_ort_emulated(
    onnx_path: str | os.PathLike,
    inputs: dict[str, np.ndarray],
    cpu: str = DEFAULT_CPU,
    batch: int | None = None,
    optimized_model_path: str | os.PathLike | None = None,
    timeout: float = 3600,
) -> list[np.ndarray]:
    """Outputs of ``onnx_path`` on ``inputs`` in ORT (CPUExecutionProvider, one intra-op
    thread, default graph optimisations) on the emulated ``cpu``. ``batch`` splits the inputs
    along axis 0 into runs of at most that size (outputs concatenated); ``optimized_model_path``
    saves the graph ORT optimised for that CPU."""
    with tempfile.TemporaryDirectory(prefix="graphopt-qemu-") as tmp_s:
        tmp = Path(tmp_s)
        np.savez(tmp / "inputs.npz", **{k: np.ascontiguousarray(v) for k, v in inputs.items()})
        job = {"model": str(Path(onnx_path).resolve()), "batch": batch}
        if optimized_model_path is not None:
            job["optimized"] = str(Path(optimized_model_path).resolve())
        done = _call(job, cpu, tmp, timeout)
        with np.load(tmp / "outputs.npz") as z:
            return [z[f"out{i}"] for i in range(done["outputs"])]


def emulated_features(cpu: str = DEFAULT_CPU, timeout: float = 120) -> dict[str, bool]:
    """The CPU features the emulated process sees through CPUID (numpy's runtime dispatch
    table: ``AVX2``, ``AVX512F``, ``AVX512VNNI``, ...), and ORT's version."""
    with tempfile.TemporaryDirectory(prefix="graphopt-qemu-") as tmp_s:
        return _call({"features": True}, cpu, Path(tmp_s), timeout)["features"]


def describe(cpu: str = DEFAULT_CPU) -> str:
    """One line for a benchmark header: qemu's version, ``cpu`` and the int8-relevant features
    the emulated process sees."""
    qemu = _qemu()
    version = subprocess.run([str(qemu), "--version"], capture_output=True, text=True).stdout
    feats = emulated_features(cpu)
    names = ("AVX2", "AVX512F", "AVX512VNNI", "AVX_VNNI")
    seen = ", ".join(f"{n} {'yes' if feats.get(n) else 'no'}" for n in names if n in feats)
    return (
        f"onnxruntime {feats['onnxruntime']} under {version.splitlines()[0].strip()} "
        f"-cpu {cpu} (CPUID: {seen})"
    )


# -- the worker (runs under qemu: numpy and onnxruntime only) -------------------------------------
def _worker(tmp: Path) -> None:
    import onnxruntime as ort

    job = json.loads((tmp / "job.json").read_text())
    if job.get("features"):
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as feats
        except ImportError:  # numpy < 2
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        done = {"features": {**feats, "onnxruntime": ort.__version__}}
        (tmp / "done.json").write_text(json.dumps(done))
        return
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if job.get("optimized"):
        opts.optimized_model_filepath = job["optimized"]
    sess = ort.InferenceSession(job["model"], opts, providers=["CPUExecutionProvider"])
    with np.load(tmp / "inputs.npz") as z:
        feed = {k: z[k] for k in z.files}
    n = len(next(iter(feed.values())))
    size = job.get("batch") or n
    runs = [
        sess.run(None, {k: v[i : i + size] for k, v in feed.items()}) for i in range(0, n, size)
    ]
    outs = [np.concatenate(parts) for parts in zip(*runs)]
    np.savez(tmp / "outputs.npz", **{f"out{i}": o for i, o in enumerate(outs)})
    (tmp / "done.json").write_text(json.dumps({"outputs": len(outs)}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
