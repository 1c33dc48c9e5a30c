"""Packaging: ``passes/`` and ``backends/`` are installed as ``graphopt.passes`` and
``graphopt.backends``, both from a built wheel (installed into a target directory and imported
with the source tree off the path) and from the editable install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from .pip_build import build_args

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = {"fold-bn", "dce", "remove-identity"}


_IMPORT_CHECK = """
import json, sys
import graphopt, graphopt.passes, graphopt.backends, graphopt.backends.onnxruntime
from graphopt import REGISTRY
print("RESULT" + json.dumps({
    "graphopt": graphopt.__file__,
    "passes": graphopt.passes.__file__,
    "backends": graphopt.backends.__file__,
    "onnxruntime": graphopt.backends.onnxruntime.__file__,
    "fold_bn": REGISTRY.get("fold-bn").__module__,
    "names": {n: REGISTRY.origin(n) for n in REGISTRY.names()},
    "path": sys.path,
}))
"""


def _run(code: str, cwd: Path, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _inside(path: str, directory: Path) -> bool:
    return Path(path).resolve().is_relative_to(directory.resolve())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources (an in-tree build would write ``build/`` and
    ``*.egg-info`` into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("graphopt", "passes", "backends"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = tmp / "dist"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            *build_args(),
            "--wheel-dir",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = dist.glob("graphopt-*.whl")
    return whl


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(
            zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")
        )
    for required in (
        "graphopt/__init__.py",
        "graphopt/manager.py",
        "graphopt/passes/__init__.py",
        "graphopt/passes/fold_bn.py",
        "graphopt/passes/dce.py",
        "graphopt/passes/remove_identity.py",
        "graphopt/backends/__init__.py",
        "graphopt/backends/onnxruntime.py",
    ):
        assert required in names, f"{required} missing from the wheel"
    # the source folders are not shipped as top-level packages, and tests are not shipped
    assert not any(n.startswith(("passes/", "backends/", "tests/", "examples/")) for n in names)
    assert "graphopt = graphopt.app.cli:main" in entry_points


def test_wheel_installs_and_imports_passes_and_backends(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-index",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    out = _run(_IMPORT_CHECK, cwd=elsewhere, pythonpath=str(site))
    assert not any(Path(p).resolve() == ROOT.resolve() for p in out["path"] if p)
    for key in ("graphopt", "passes", "backends", "onnxruntime"):
        assert _inside(out[key], site), f"{key} imported from {out[key]}, not the wheel"
    assert Path(out["passes"]).parent == site / "graphopt" / "passes"
    assert out["fold_bn"] == "graphopt.passes.fold_bn"
    for name in BUILTINS:
        assert out["names"].get(name) == "builtin", name


def test_editable_install_imports_from_the_source_tree(tmp_path):
    out = _run(_IMPORT_CHECK, cwd=tmp_path, pythonpath=None)
    assert not any(Path(p).resolve() == ROOT.resolve() for p in out["path"] if p)
    assert Path(out["graphopt"]).resolve() == ROOT / "graphopt" / "__init__.py"
    assert Path(out["passes"]).resolve() == ROOT / "passes" / "__init__.py"
    assert Path(out["backends"]).resolve() == ROOT / "backends" / "__init__.py"
    assert Path(out["onnxruntime"]).resolve() == ROOT / "backends" / "onnxruntime.py"
    for name in BUILTINS:
        assert out["names"].get(name) == "builtin", name
