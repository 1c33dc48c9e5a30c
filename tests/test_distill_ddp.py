"""Distillation under DistributedDataParallel: 2 CPU processes with gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    import graphopt
    from graphopt.zoo.datasets import load_data
    from graphopt.zoo.models import load_model

    model, _ = load_model("digits:vgg")
    data = load_data("digits")
    result = graphopt.compress(
        model,
        "fold-bn,prune(ratio=0.5),distill(epochs=2)",
        example_inputs=(data.train[0][0][:8],),
        data=data.train,
    )
    report = result.reports[-1].details
    torch.save(
        {"state": result.graph.module.state_dict(), "report": report}, Path(out) / f"rank{rank}.pt"
    )
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_end_with_identical_weights_and_the_loss_falls(tmp_path):
    from graphopt.zoo.models import load_model

    load_model("digits:vgg")  # train and cache the teacher once, before the ranks start
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    for r in (r0, r1):
        assert r["report"]["world_size"] == 2
        assert r["report"]["loss_last"] < r["report"]["loss_first"]


@pytest.mark.slow
def test_torchrun_cli_rank_zero_alone_writes(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "graphopt",
        "run",
        "digits:vgg",
        "--pipeline",
        "prune(ratio=0.5),distill(epochs=2)",
        "--data",
        "digits",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["passes"][-1]["details"]["world_size"] == 2
    assert (out / "distill" / "distill.pt").exists()
    assert proc.stdout.count("wrote ") == 1  # one rank printed and wrote
