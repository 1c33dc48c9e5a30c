"""Runs killed from outside: ``--out`` always holds one complete run (the previous one or the
new one), SIGTERM cleans up like Ctrl-C, and ``distill(resume=true)`` continues from the last
checkpoint after a SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graphopt.app.staging import MANIFEST

PIPELINE = "fold-bn,prune(ratio=0.5),distill(epochs={epochs}{resume})"
KILLS = int(os.environ.get("GRAPHOPT_FAULT_KILLS", "4"))


def _start(out: Path, cache: Path, epochs: int, resume: bool = False) -> subprocess.Popen:
    pipeline = PIPELINE.format(epochs=epochs, resume=",resume=true" if resume else "")
    cmd = [sys.executable, "-m", "graphopt", "run", "digits:vgg", "--data", "digits",
           "--backend", "none", "--pipeline", pipeline, "--out", str(out)]  # fmt: skip
    env = {**os.environ, "GRAPHOPT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _complete_run(out: Path) -> dict[str, bytes]:
    """The run's files (the manifest's, bar the live checkpoint directory) and their bytes;
    fails unless every listed file is there and nothing else is."""
    listed = json.loads((out / MANIFEST).read_text())["files"]
    present = {p.name for p in out.iterdir()} - {MANIFEST}
    assert present == set(listed), (present, listed)
    json.loads((out / "report.json").read_text())  # whole, parseable
    return {name: (out / name).read_bytes() for name in listed if (out / name).is_file()}


def _checkpoint_epoch(out: Path) -> int:
    path = out / "distill" / "distill.pt"
    if not path.exists():
        return 0
    import torch

    return int(torch.load(path, weights_only=True)["epoch"])


def test_sigterm_leaves_earlier_outputs_intact(digits_cache, tmp_path):
    out = tmp_path / "out"
    proc = _start(out, digits_cache, epochs=1)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    before = _complete_run(out)
    proc = _start(out, digits_cache, epochs=40)
    _wait_for_staging(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    assert "terminated" in err.decode() and "Traceback" not in err.decode()
    assert _complete_run(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left


def _wait_for_staging(parent: Path, proc: subprocess.Popen, limit: float = 120) -> None:
    t0 = time.monotonic()
    while not any(p.name.startswith(".out.graphopt-staging-") for p in parent.iterdir()):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() - t0 < limit
        time.sleep(0.1)


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL timing test for Linux")
def test_sigkill_at_random_points_then_resume(digits_cache, tmp_path):
    out = tmp_path / "out"
    proc = _start(out, digits_cache, epochs=2)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    complete = [_complete_run(out)]
    rng = random.Random(0)
    for _ in range(KILLS):
        proc = _start(out, digits_cache, epochs=6, resume=_checkpoint_epoch(out) > 0)
        time.sleep(rng.uniform(0.5, 12.0))
        proc.kill()
        proc.wait()
        state = _complete_run(out)  # the previous complete run, or this one if it finished
        if state != complete[-1]:
            assert proc.returncode == 0 or state["report.json"] != complete[-1]["report.json"]
            complete.append(state)
    epoch = _checkpoint_epoch(out)
    proc = _start(out, digits_cache, epochs=6, resume=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()
    report = json.loads((out / "report.json").read_text())
    details = next(p for p in report["passes"] if p["name"] == "distill")["details"]
    assert details["resumed_at_epoch"] == min(epoch, 6)
    assert details["epochs_run"] == 6  # the history holds the checkpointed epochs too
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # stale staging removed
