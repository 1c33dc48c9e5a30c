"""Bad and hostile input to the CLI, one row each: the exit code, a fragment of the one-line
message, and that nothing is written outside ``--out`` and nothing half-written inside it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from graphopt.app import cli
from graphopt.app.staging import MANIFEST

MODELS = """
import torch, torch.nn as nn

class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))

def branchy():
    torch.manual_seed(0)
    return Branchy()

def nan_weights():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float("nan")
    return net

def two_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, a, b):
            return self.a(a) + self.b(b)

    return Two()

def small():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))

def broken():
    raise RuntimeError("factory exploded")
"""


class Payload:
    """Unpickling this creates the file ``marker``: what a hostile file does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Case:
    name: str
    args: list[str]
    code: int
    fragments: tuple[str, ...]
    out_written: bool = False  # whether --out exists afterwards
    extra: list[str] = field(default_factory=list)


def _cases(w: Path) -> list[Case]:
    py = w / "models.py"
    run = ["run", "--out", str(w / "out"), "--runs", "2"]
    small = f"{py}:small"
    return [
        Case("pickled model", [*run, str(w / "evil.pt"), "--pipeline", "dce"], 2,
             ("pickled Python object", "--trust-pickle")),
        Case("pickled teacher", [*run, small, "--input-shape", "2,1,8,8", "--data",
             str(w / "x.pt"), "--pipeline", f'distill(teacher="{w / "evil.pt"}",epochs=1)'],
             2, ("distill", "trust-pickle")),
        Case("pickled data", [*run, small, "--input-shape", "2,1,8,8", "--data",
             str(w / "evil_data.pt"), "--pipeline", "qdq"], 2, ("evil_data.pt",)),
        Case("frozen branch", [*run, f"{py}:branchy", "--input-shape", "2,8", "--leaf", "gate",
             "--pipeline", "dce"], 2, ("--allow-torchscript",)),
        Case("frozen branch allowed", [*run, f"{py}:branchy", "--input-shape", "2,8", "--leaf",
             "gate", "--pipeline", "dce", "--allow-torchscript"], 2,
             ("disagrees with its torch graph", "probe input")),
        Case("NaN weights", [*run, f"{py}:nan_weights", "--input-shape", "1,1,8,8",
             "--pipeline", "fold-bn"], 2, ("NaN",)),
        Case("unknown pass", [*run, small, "--pipeline", "fold-bm"], 2,
             ("unknown pass 'fold-bm'", "fold-bn")),
        Case("bad option", [*run, small, "--pipeline", "prune(ratio=2)"], 2, ("ratio",)),
        Case("two input shapes", [*run, small, "--input-shape", "1,1,8,8", "--input-shape",
             "1,1,8,8", "--pipeline", "dce"], 2, ("--input-shape once",)),
        Case("unknown input name", [*run, f"{py}:two_inputs", "--input", "a=1,4", "--input",
             "c=1,4", "--pipeline", "dce"], 2, ("'c'", "a, b")),
        Case("missing data file", [*run, small, "--input-shape", "1,1,8,8", "--data",
             str(w / "none.npy"), "--pipeline", "qdq"], 2, ("none.npy",)),
        Case("data of another shape", [*run, small, "--input-shape", "1,1,8,8", "--data",
             str(w / "wide.npy"), "--pipeline", "qdq"], 2, ("wide.npy",)),
        Case("empty data", [*run, small, "--input-shape", "1,1,8,8", "--data",
             str(w / "empty.npy"), "--pipeline", "qdq"], 2, ("empty.npy",)),
        Case("factory raises", [*run, f"{py}:broken", "--pipeline", "dce"], 2,
             ("factory exploded",)),
        Case("out is a file", ["run", "--out", str(w / "afile"), small, "--input-shape",
             "1,1,8,8", "--pipeline", "dce"], 2, ("afile", "directory")),
        Case("emit-c out is a file", ["emit-c", str(w / "small.onnx"), "--out",
             str(w / "afile")], 2, ("afile",)),
        Case("emit-c shape that does not fit", ["emit-c", str(w / "small.onnx"), "--out",
             str(w / "out"), "--input-shape", "input=1,1,16,16"], 2, ("1x1x16x16", "1x8x8")),
        Case("bench shape that does not fit", ["bench", str(w / "small.onnx"), "--input-shape",
             "1,1,16,16"], 2, ("does not fit",)),
        Case("missing onnx", ["emit-c", str(w / "none.onnx"), "--out", str(w / "out")], 2,
             ("does not exist",)),
        Case("empty pipeline", [*run, small, "--input-shape", "1,1,8,8", "--pipeline", "",
             "--backend", "none"], 0, ("pipeline is empty",), out_written=True),
        Case("ratio above max-ratio", [*run, small, "--input-shape", "1,1,8,8", "--pipeline",
             "prune(ratio=0.95)", "--backend", "none"], 0, ("max-ratio",), out_written=True),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("hostile")
    (w / "models.py").write_text(MODELS)
    torch.save(Payload(str(w / "PWNED")), w / "evil.pt")
    torch.save(Payload(str(w / "PWNED")), w / "evil_data.pt")
    torch.save(torch.randn(16, 1, 8, 8), w / "x.pt")
    np.save(w / "wide.npy", np.random.rand(8, 1, 9, 9).astype(np.float32))
    np.save(w / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    (w / "afile").write_text("not a directory")
    from graphopt.backends.onnxruntime import export
    from graphopt.tracing import trace

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()
    export(trace(net, torch.randn(1, 1, 8, 8)), w / "small.onnx")
    return w


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    "index", range(len(_cases(Path("/x")))), ids=[c.name for c in _cases(Path("/x"))]
)
def test_hostile_input(workdir, index, capsys):
    case = _cases(workdir)[index]
    out = workdir / "out"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    before = _listing(workdir)
    code = cli.main(case.args)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    for fragment in case.fragments:
        assert fragment in err, err
    if code != 0:
        lines = [line for line in err.splitlines() if line.startswith("graphopt: error:")]
        assert len(lines) == 1, err
    assert not (workdir / "PWNED").exists()  # no pickle payload ran
    after = _listing(workdir)
    created = {p for p in after - before if not p.startswith("out")}
    assert not created, f"files created outside --out: {created}"
    assert out.exists() == case.out_written
    if out.exists():  # a complete run: exactly the manifest's files, nothing half-written
        listed = set(__import__("json").loads((out / MANIFEST).read_text())["files"])
        assert {p.name for p in out.iterdir()} == listed | {MANIFEST}
        assert not any(p.name.startswith(".") for p in out.rglob("*"))
    assert (workdir / "afile").read_text() == "not a directory"
