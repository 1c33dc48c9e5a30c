"""Plug-in discovery through a real entry point: ``examples/custom_pass`` is installed into a
temporary target directory, and subprocesses with that directory on ``PYTHONPATH`` see its
``strip-noops`` pass in ``graphopt passes``, in the registry and in a pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from graphopt.registry import ENTRY_POINT_GROUP, Registry

from .pip_build import build_args

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_pass"
PASS = "strip-noops"
DIST = "graphopt-example-pass"


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site)
    env.pop("PYTHONSTARTUP", None)
    return env


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """``pip install --target`` of a copy of the example (the build must not write into the
    source tree)."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(
        EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    site = tmp / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            *build_args(),
            "--target",
            str(site),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (dist_info,) = site.glob("graphopt_example_pass-*.dist-info")
    assert f"[{ENTRY_POINT_GROUP}]" in (dist_info / "entry_points.txt").read_text()
    return site


def _python(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=_env(site),
        cwd=cwd,
        timeout=120,
    )


def test_not_registered_without_the_install():
    """The pass comes from the entry point only: without the install, nobody knows it."""
    try:
        metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        assert PASS not in Registry().names()
    else:
        pytest.skip(f"{DIST} is installed in this environment (pip install examples/custom_pass)")


_API_CHECK = """
import json
import torch
import torch.nn as nn
import graphopt
from graphopt import REGISTRY, Pipeline
from graphopt.errors import OptionError

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.bn(self.conv(x)).contiguous()
        y = x.detach().mean((2, 3))
        return self.fc(y)

torch.manual_seed(0)
model = Net().eval()
x = torch.randn(2, 3, 8, 8)
out = {}
out["names"] = REGISTRY.names()
out["origin"] = REGISTRY.origin("strip-noops")
cls = REGISTRY.get("strip-noops")
out["module"] = cls.__module__
out["exact"] = cls.exact

pipe = Pipeline.parse("strip-noops(methods=[contiguous]),fold-bn,dce")
out["text"] = str(pipe)
result = pipe.run(graphopt.trace(model, x))
out["report"] = result.reports[0].details
out["verified"] = result.reports[0].verified
methods = [n.target for n in result.graph.nodes if n.op == "call_method"]
out["methods_left"] = methods
out["close"] = bool(torch.allclose(result.graph.module(x), model(x), rtol=1e-4, atol=1e-5))

result = graphopt.compress(model, "strip-noops", example_inputs=x)
out["methods_left_default"] = [n.target for n in result.graph.nodes if n.op == "call_method"]
try:
    Pipeline.parse("strip-noops(methods=[clone])")
except OptionError as e:
    out["option_error"] = str(e)
print("RESULT" + json.dumps(out))
"""


def test_plugin_pass_is_registered_and_runs_in_a_pipeline(plugin_site, tmp_path):
    proc = _python(plugin_site, _API_CHECK, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    assert PASS in out["names"] and "fold-bn" in out["names"]
    assert out["origin"] == f"plugin:{DIST}"
    assert out["module"] == "graphopt_example_pass"
    assert out["exact"] is True
    # the option parsed, printed back, and took effect: only .contiguous() was removed
    assert out["text"] == "strip-noops(methods=[contiguous]),fold-bn,dce"
    assert out["report"]["summary"] == "removed 1 no-op call(s)"
    assert out["verified"] is True  # exact: the manager checked the outputs
    assert "contiguous" not in out["methods_left"]
    assert "detach" in out["methods_left"]
    assert out["close"] is True
    # with the default options both calls go
    assert "contiguous" not in out["methods_left_default"]
    assert "detach" not in out["methods_left_default"]
    # a typed option: a value outside the choices is refused, naming the choices
    assert "methods" in out["option_error"] and "contiguous, detach" in out["option_error"]


def test_cli_lists_the_plugin_pass(plugin_site, tmp_path):
    # graphopt.app.cli is part of the package; this must not be skipped
    import graphopt.app.cli  # noqa: F401

    proc = subprocess.run(
        [sys.executable, "-m", "graphopt", "passes"],
        capture_output=True,
        text=True,
        env=_env(plugin_site),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert f"{PASS}  [exact, plugin:{DIST}]" in text
    block = text.split(f"{PASS}  [", 1)[1].split("\n\n", 1)[0]
    assert "Remove no-op tensor method calls" in block
    assert "methods" in block and "[contiguous,detach]" in block
    # built-ins are still listed as built-ins
    assert "fold-bn  [exact, builtin]" in text


def test_cli_runs_a_pipeline_with_the_plugin_pass(plugin_site, tmp_path):
    model_file = tmp_path / "net.py"
    model_file.write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.conv = nn.Conv2d(3, 4, 3)
                    self.bn = nn.BatchNorm2d(4)

                def forward(self, x):
                    return self.bn(self.conv(x.contiguous())).detach()

            def make():
                return Net().eval()
            """
        )
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphopt",
            "run",
            f"{model_file}:make",
            "--input-shape",
            "1,3,8,8",
            "--pipeline",
            f"{PASS}(methods=[detach]),fold-bn",
            "--backend",
            "none",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_env(plugin_site),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"] == f"{PASS}(methods=[detach]),fold-bn"
    first = report["passes"][0]
    assert first["name"] == PASS and first["modified"] and first["verified"]
    assert first["details"]["removed"] and len(first["details"]["removed"]) == 1
    assert PASS in proc.stdout  # the summary table


def test_builtin_table_names_each_pass_it_promises():
    """Every lazy built-in entry imports to a Pass class carrying exactly that name."""
    from graphopt.pass_api import Pass
    from graphopt.passes import BUILTIN_PASSES

    reg = Registry()
    assert set(BUILTIN_PASSES) <= set(reg.names())
    for name in BUILTIN_PASSES:
        cls = reg.get(name)
        assert issubclass(cls, Pass) and cls.name == name
        assert reg.origin(name) == "builtin"


def test_parsing_a_pipeline_imports_only_its_passes():
    code = textwrap.dedent(
        """
        import sys
        from graphopt.manager import Pipeline
        Pipeline.parse("fold-bn,prune(ratio=0.5)")
        loaded = sorted(m for m in sys.modules if m.startswith("graphopt.passes."))
        print(" ".join(loaded))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    assert "graphopt.passes.prune" in loaded and "graphopt.passes.fold_bn" in loaded
    assert not any(m.startswith(("graphopt.passes.qdq", "graphopt.passes.distill")) for m in loaded)


def test_a_user_pass_cannot_silently_take_a_lazy_builtin_name():
    from graphopt.pass_api import Pass

    reg = Registry()
    reg.names()  # load the entry points; the built-ins are still unimported

    class Impostor(Pass):
        name = "qdq"

    with pytest.raises(ValueError, match="already registered"):
        reg.add(Impostor)
    assert reg.get("qdq").__module__.startswith("graphopt.passes.qdq")
