"""graphopt.app.staging.staged_outputs: a command's outputs replace those in ``--out`` only when
it succeeds, and no staging directory is left behind either way."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from graphopt.app.staging import MANIFEST, manifest, staged_outputs
from graphopt.errors import GraphoptError


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path below ``root`` with its bytes (``None`` for a directory)."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def out(tmp_path) -> Path:
    out = tmp_path / "out"
    (out / "stages").mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"old model")
    (out / "report.json").write_text('{"old": true}')
    (out / "stages" / "0-original.onnx").write_bytes(b"old stage")
    return out


@pytest.mark.parametrize("exc", [RuntimeError("export failed"), KeyboardInterrupt()])
def test_a_failed_run_leaves_the_previous_outputs_intact(out, exc):
    before = snapshot(out)
    with pytest.raises(type(exc)):
        with staged_outputs(out) as stage:
            (stage / "model.onnx").write_bytes(b"half a new model")
            (stage / "stages").mkdir()
            (stage / "stages" / "0-original.onnx").write_bytes(b"new stage")
            raise exc
    assert snapshot(out) == before  # no partial file, no staging directory


def test_a_successful_run_replaces_what_it_wrote(out):
    with staged_outputs(out) as stage:
        assert stage.parent == out.parent and stage.name.startswith(".")  # hidden sibling
        (stage / "model.onnx").write_bytes(b"new model")
        (stage / "stages").mkdir()
        (stage / "stages" / "1-pruned.onnx").write_bytes(b"new stage")
        assert (out / "model.onnx").read_bytes() == b"old model"  # nothing shows before the end
    assert snapshot(out) == {
        "model.onnx": b"new model",
        "report.json": b'{"old": true}',  # not written by a graphopt run (no manifest): kept
        "stages": None,
        "stages/1-pruned.onnx": b"new stage",  # a directory is replaced as a whole
        MANIFEST: b'{\n  "files": [\n    "model.onnx",\n    "stages"\n  ]\n}\n',
    }
    assert manifest(out) == ["model.onnx", "stages"]


def test_a_second_run_leaves_only_its_own_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with staged_outputs(out) as stage:
        (stage / "model.onnx").write_bytes(b"1")
        (stage / "prune_plan.json").write_text("{}")
    with staged_outputs(out, keep=("distill",)) as stage:
        (out / "distill").mkdir()  # checkpoints are written into out directly
        (out / "distill" / "ckpt.pt").write_bytes(b"c")
        (stage / "model.onnx").write_bytes(b"2")
    assert sorted(p.name for p in out.iterdir()) == [
        "distill",
        MANIFEST,
        "model.onnx",
        "notes.txt",
    ]  # the first run's plan is gone, the user's notes and this run's checkpoints stay
    assert manifest(out) == ["distill", "model.onnx"]
    with staged_outputs(out) as stage:  # a run without distill drops the old checkpoints
        (stage / "model.onnx").write_bytes(b"3")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "model.onnx", "notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left


def test_a_killed_runs_staging_directory_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = tmp_path / f".out.graphopt-staging-{proc.pid}-abc"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    with staged_outputs(out) as stage:
        (stage / "model.onnx").write_bytes(b"new")
    assert not stale.exists()
    assert (out / "model.onnx").read_bytes() == b"new"


def test_a_failed_first_run_leaves_no_output_directory(tmp_path):
    out = tmp_path / "fresh" / "out"
    with pytest.raises(RuntimeError):
        with staged_outputs(out) as stage:
            (stage / "model.onnx").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not out.exists()
    assert (tmp_path / "fresh").is_dir()  # parents made on the way stay (they may be shared)


def test_a_successful_first_run_creates_the_directory(tmp_path):
    out = tmp_path / "fresh"
    with staged_outputs(out) as stage:
        (stage / "sweep.csv").write_text("ratio\n0\n")
    assert snapshot(out) == {"sweep.csv": b"ratio\n0\n", MANIFEST: snapshot(out)[MANIFEST]}
    assert manifest(out) == ["sweep.csv"]


def test_an_output_path_that_is_a_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a directory")
    with pytest.raises(GraphoptError, match="cannot create the output directory"):
        with staged_outputs(path):
            pytest.fail("the body must not run")
    assert path.read_text() == "not a directory"
