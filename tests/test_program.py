"""Saving without pickle: graphopt's ``model.pt2`` round trip, and ``.pt`` files that are not
unpickled unless the user trusts them."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.app import cli
from graphopt.cost import cost_of
from graphopt.errors import ModelSpecError
from graphopt.program import load_program, save_program
from graphopt.tracing import trace
from graphopt.zoo.models import load_model


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.conv2(y)
        return self.fc(self.norm(y.mean((2, 3))))


def _data(n=3):
    return [torch.randn(4, 3, 8, 8) for _ in range(n)]


@pytest.mark.parametrize(
    "pipeline", ["fold-bn,prune(ratio=0.5)", "qdq", "qdq(activations=dynamic)", "prune(ratio=0.25)"]
)
def test_saved_program_reloads_with_equal_outputs_and_cost(tmp_path, pipeline):
    x = torch.randn(1, 3, 8, 8)
    result = graphopt.Pipeline.parse(pipeline).run(trace(Block().eval(), (x,)), data=_data())
    path = tmp_path / "model.pt2"
    save_program(result.graph.module, (x,), path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]  # no temporary file left
    loaded = load_program(path)
    batch = torch.randn(5, 3, 8, 8)  # another batch size: the batch dimension stays dynamic
    torch.testing.assert_close(loaded(batch), result.graph.module(batch), rtol=0, atol=0)
    again = trace(loaded, (x,))
    before, after = cost_of(result.graph), cost_of(again)
    assert (after.params, after.macs) == (before.params, before.macs)


def test_a_reloaded_pruned_model_prunes_again(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    first = graphopt.Pipeline.parse("fold-bn,prune(ratio=0.25)").run(trace(Block().eval(), (x,)))
    save_program(first.graph.module, (x,), tmp_path / "m.pt2")
    loaded = load_program(tmp_path / "m.pt2")
    # the rebuilt layers are modules of their type, so the channel analysis sees them
    assert isinstance(loaded.get_submodule("conv2"), nn.Conv2d)
    assert loaded.get_submodule("conv2").groups == 2
    assert isinstance(loaded.get_submodule("norm"), nn.LayerNorm)
    second = graphopt.Pipeline.parse("prune(ratio=0.5)").run(trace(loaded, (x,)))
    assert second.reports[0].details["units_removed"] > 0
    assert cost_of(second.graph).params < cost_of(first.graph).params


def test_pruning_a_quantized_reload_warns(tmp_path, caplog):
    x = torch.randn(1, 3, 8, 8)
    result = graphopt.Pipeline.parse("fold-bn,qdq").run(trace(Block().eval(), (x,)), data=_data())
    save_program(result.graph.module, (x,), tmp_path / "q.pt2")
    graph = trace(load_program(tmp_path / "q.pt2"), (x,))
    assert cost_of(graph).params == cost_of(result.graph).params  # int8 weights counted
    with caplog.at_level("WARNING"):
        graphopt.Pipeline.parse("prune(ratio=0.5)").run(graph)
    assert "nothing to prune" in caplog.text and "prune before qdq" in caplog.text


class Payload:
    """Unpickling this runs ``touch MARKER``: what a hostile file does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_pickle_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save(Payload(str(marker)), evil)
    with pytest.raises(ModelSpecError, match="pickled Python object.*--trust-pickle"):
        load_model(str(evil))
    code = cli.main(["run", str(evil), "--pipeline", "dce", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--trust-pickle" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "o").exists()
    teacher = f'distill(teacher="{evil}",epochs=1)'
    with pytest.raises(graphopt.PassFailure, match="trust-pickle"):
        graphopt.Pipeline.parse(teacher).run(
            trace(Block().eval(), torch.randn(1, 3, 8, 8)), data=_data()
        )
    assert not marker.exists()


def test_trust_pickle_loads_a_whole_module(tmp_path, capsys):
    path = tmp_path / "whole.pt"
    torch.save(Block().eval(), path)
    code = cli.main(
        ["run", str(path), "--input-shape", "1,3,8,8", "--pipeline", "fold-bn",
         "--backend", "none", "--trust-pickle", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "model.pt2").is_file()


def test_cli_runs_on_its_own_output(tmp_path, capsys):
    path = tmp_path / "block.pt2"
    x = torch.randn(1, 3, 8, 8)
    save_program(Block().eval(), (x,), path)
    code = cli.main(
        ["run", str(path), "--input-shape", "2,3,8,8", "--pipeline", "fold-bn,prune(ratio=0.5)",
         "--out", str(tmp_path / "o"), "--runs", "2"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    second = load_program(tmp_path / "o" / "model.pt2")
    assert second.get_submodule("conv1").out_channels == 4


def test_a_missing_or_broken_program_is_named(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_program(tmp_path / "none.pt2")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelSpecError, match="bad.pt2.*torch.export program"):
        load_model(str(bad))
