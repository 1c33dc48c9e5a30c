"""The ``graphopt`` command line, run in-process through ``graphopt.app.cli.main`` (plus one
``python -m graphopt`` subprocess)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from graphopt.app import cli
from graphopt.app.staging import MANIFEST
from graphopt.errors import BackendError, ModelSpecError
from graphopt.zoo import digits
from graphopt.zoo.models import load_model


@pytest.fixture(scope="module")
def run_dir(digits_cache, tmp_path_factory):
    """One successful ``graphopt run`` shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run") / "out"
    code = cli.main(
        ["run", "digits:vgg", "--pipeline", "fold-bn,dce", "--out", str(out), "--runs", "5"]
    )
    assert code == 0
    return out


def invoke(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("graphopt: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_run_writes_reloadable_outputs(run_dir, digits_cache):
    assert sorted(p.name for p in run_dir.iterdir()) == [
        MANIFEST,
        "model.onnx",
        "model.pt2",
        "report.json",
    ]
    reloaded = torch.export.load(run_dir / "model.pt2").module()  # plain torch, no pickle
    original = digits.pretrained_vgg()
    x = digits.load_digits_data().x_test
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), original(x), rtol=1e-4, atol=1e-4)


def test_run_report_has_passes_cost_and_parity(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert report["pipeline"] == "fold-bn,dce"
    assert [p["name"] for p in report["passes"]] == ["fold-bn", "dce"]
    assert report["passes"][0]["details"]["summary"]
    assert report["input_shape"] == [1, 1, 8, 8]
    before, after = report["cost"]["original"], report["cost"]["optimized"]
    assert before["params"] > after["params"] > 0 and before["macs"] == after["macs"]
    for row in report["results"].values():
        assert row["latency"]["median_ms"] > 0
        assert row["parity"]["ok"] and row["parity"]["cosine"] > 0.9999
    assert report["versions"]["torch"] == torch.__version__


def test_run_prints_summary_and_table(digits_cache, tmp_path, capsys):
    code, out, err = invoke(
        capsys, "run", "digits:vgg", "--pipeline", "fold-bn,remove-identity,dce",
        "--out", tmp_path / "o", "--backend", "none", "--data", "digits",
        "--print-after", "remove-identity",
    )  # fmt: skip
    assert code == 0, err
    assert "// graph after 02-remove-identity" in out
    assert "folded 4 of 4 BatchNorms" in out
    rows = [line.split("|")[0].strip() for line in out.splitlines()]
    assert "original" in rows and "optimized" in rows
    assert "top-1 (torch)" in out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        MANIFEST,
        "model.pt2",
        "report.json",
    ]


MAKERS = """
import torch.nn as nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

def boom():
    raise ValueError("boom")

def not_a_module():
    return 42
"""


@pytest.fixture
def makers(tmp_path) -> Path:
    path = tmp_path / "makers.py"
    path.write_text(textwrap.dedent(MAKERS))
    return path


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--pipeline", "fold-bm"], ["unknown pass 'fold-bm'", "did you mean 'fold-bn'"]),
        (["--pipeline", "fold-bn(bogus=1)"], ["no option 'bogus'", "backward"]),
        (["--pipeline", "fold-bn(backward=maybe)"], ["backward", "maybe"]),
        (["--pipeline", "dce", "--input-shape", "1,3,8,8"], ["1, 3, 8, 8", "--input-shape"]),
        (["--pipeline", "dce", "--data", "mnist"], ["unknown data set 'mnist'", "digits"]),
        (["--pipeline", "dce", "--print-after", "fold-bm"], ["did you mean 'fold-bn'"]),
        (["--pipeline", "fold-bn,,dce"], ["column 9", "fold-bn,,dce"]),
    ],
)
def test_run_rejects_bad_input_with_one_line(digits_cache, tmp_path, capsys, args, fragments):
    code, out, err = invoke(capsys, "run", "digits:vgg", "--out", tmp_path / "o", *args)
    assert_one_error_line(code, err, *fragments)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "model, fragments",
    [
        ("nope.py:make", ["nope.py", "does not exist"]),
        ("{makers}:boom", ["ValueError", "boom"]),
        ("{makers}:not_a_module", ["int", "not a torch.nn.Module"]),
        ("{makers}:mkae", ["no factory 'mkae'", "did you mean 'make'"]),
        ("nosuchpkg.models:make", ["nosuchpkg"]),
        ("torchvision:resnet19", ["did you mean 'torchvision:resnet18'"]),
        ("digits:resnet", ["digits:vgg"]),
        ("what", ["torchvision:NAME", "file.py:factory"]),
    ],
)
def test_bad_model_specs_fail_with_one_line(makers, tmp_path, capsys, model, fragments):
    spec = model.format(makers=makers)
    code, out, err = invoke(capsys, "run", spec, "--pipeline", "dce", "--out", tmp_path / "o")
    assert_one_error_line(code, err, *fragments)


def test_factory_file_model_runs_and_data_must_fit(makers, tmp_path, capsys):
    spec = f"{makers}:make"
    code, out, err = invoke(capsys, "inspect", spec, "--input-shape", "1,3,8,8")
    assert code == 0, err
    assert "1x4x6x6" in out
    code, out, err = invoke(
        capsys, "run", spec, "--input-shape", "1,3,8,8", "--data", "digits",
        "--pipeline", "dce", "--out", tmp_path / "o",
    )  # fmt: skip
    assert_one_error_line(code, err, "--data digits", "1x8x8", "3x8x8")


def test_state_dict_pt_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(digits.DigitsVGG().state_dict(), path)
    with pytest.raises(ModelSpecError, match="state_dict.*whole module"):
        load_model(str(path))


def test_saved_module_pt_loads_only_when_trusted(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(digits.DigitsVGG(), path)
    with pytest.raises(ModelSpecError, match="pickled Python object.*--trust-pickle"):
        load_model(str(path), "2,1,8,8")
    model, inputs = load_model(str(path), "2,1,8,8", trust_pickle=True)
    assert not model.training and inputs[0].shape == (2, 1, 8, 8)


def test_a_failed_run_keeps_earlier_outputs(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    from graphopt.backends import onnxruntime as ort_backend

    def broken_export(*args, **kwargs):
        raise BackendError("export exploded")

    monkeypatch.setattr(ort_backend, "export", broken_export)
    code, _, err = invoke(capsys, "run", "digits:vgg", "--pipeline", "fold-bn", "--out", out)
    assert_one_error_line(code, err, "export exploded")
    code, _, err = invoke(
        capsys, "run", "digits:vgg", "--pipeline", "dce", "--input-shape", "1,3,8,8", "--out", out
    )
    assert_one_error_line(code, err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial or temp files


def test_unexpected_errors_hint_at_debug(monkeypatch, capsys):
    def crash(args):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "cmd_passes", crash)
    code, _, err = invoke(capsys, "passes")
    assert code == 1
    assert_one_error_line(code, err, "RuntimeError: kaboom", "--debug")
    code, _, err = invoke(capsys, "passes", "--debug")
    assert code == 1 and "Traceback" in err and "kaboom" in err


def test_usage_errors_are_one_line(capsys):
    code, _, err = invoke(capsys, "run", "digits:vgg")
    assert code == 2
    assert_one_error_line(code, err, "--pipeline")
    code, _, err = invoke(capsys, "frobnicate")
    assert_one_error_line(code, err, "frobnicate")


def test_passes_lists_options(capsys):
    code, out, _ = invoke(capsys, "passes")
    assert code == 0
    block = out.split("\n\n")
    fold = next(b for b in block if b.startswith("fold-bn"))
    assert "[exact, builtin]" in fold
    assert "backward" in fold and "bool" in fold and "true" in fold
    assert any(b.startswith("dce") for b in block)


def test_python_m_graphopt_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "graphopt", "passes"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "fold-bn" in proc.stdout and "backward" in proc.stdout


def test_inspect_prints_layers_and_total(digits_cache, capsys):
    code, out, err = invoke(capsys, "inspect", "digits:vgg")
    assert code == 0, err
    assert "features.0" in out and "Conv2d" in out
    total = [line for line in out.splitlines() if line.startswith("total")]
    assert total and "25,370" in total[0]


def test_bench_onnx_and_model(run_dir, digits_cache, capsys):
    code, out, err = invoke(capsys, "bench", run_dir / "model.onnx", "--runs", "3")
    assert code == 0, err
    assert "onnxruntime" in out
    code, out, err = invoke(capsys, "bench", "digits:vgg", "--runs", "3")
    assert code == 0, err
    assert "torch" in out and "onnxruntime" in out


def test_demo_prints_every_stage(digits_cache, tmp_path, capsys):
    from graphopt.app import demo

    out_dir = tmp_path / "demo"
    code, out, err = invoke(capsys, "demo", "--out", out_dir, "--runs", "10", "--epochs", "8")
    assert code == 0, err
    labels = ["original", *(label for label, _ in demo.stages(demo.RATIO, 8))]
    for label in labels:
        assert any(line.startswith(label + " ") for line in out.splitlines()), label
    assert "top-1 (ORT)" in out and "top-1 (C)" in out
    assert {"model.onnx", "report.json", "table.md", "stages", "c"} <= {
        p.name for p in out_dir.iterdir()
    }
    report = json.loads((out_dir / "report.json").read_text())
    assert report["pipeline"] == ",".join(text for _, text in demo.stages(demo.RATIO, 8))
    assert report["failed_stage"] is None
    rows = {r["stage"]: r for r in report["stages"]}
    assert list(rows) == labels
    original, folded, pruned, distilled, quantized = rows.values()
    for row in (original, folded, distilled, quantized):
        assert row["top1_torch"] >= 0.95 and row["top1_ort"] >= 0.95, row["stage"]
    assert abs(folded["top1_ort"] - original["top1_ort"]) < 1e-9  # an exact stage
    assert pruned["cost"]["macs"] < 0.5 * original["cost"]["macs"]
    assert distilled["cost"]["macs"] == pruned["cost"]["macs"]
    assert distilled["top1_ort"] > pruned["top1_ort"]
    assert quantized["cost"]["bytes"] < 0.5 * distilled["cost"]["bytes"]
    for row in (original, folded, pruned, distilled):  # float C matches ORT's top-1
        assert row["top1_c"] == pytest.approx(row["top1_ort"], abs=1 / 360 + 1e-9), row["stage"]
        assert (out_dir / row["c_dir"] / "model.c").exists()
    if "top1_c" in quantized:  # the C backend lowers the QDQ model
        assert quantized["top1_c"] == quantized["top1_ort"]


def test_a_failing_demo_stage_says_which_and_keeps_earlier_outputs(digits_cache, tmp_path, capsys):
    out_dir = tmp_path / "demo"
    cc = tmp_path / "no-such-compiler"
    code, out, err = invoke(
        capsys, "demo", "--out", out_dir, "--runs", "5", "--epochs", "2", "--cc", cc
    )
    assert_one_error_line(code, err, "demo stage 'original' failed", "outputs still valid")
    assert (out_dir / "stages" / "0-original.onnx").exists()
    report = json.loads((out_dir / "report.json").read_text())
    assert report["failed_stage"] == "original"


def test_emit_c_writes_sources_and_a_report(run_dir, tmp_path, capsys):
    out = tmp_path / "c"
    code, text, err = invoke(capsys, "emit-c", run_dir / "model.onnx", "--out", out)
    assert code == 0, err
    assert {"model.h", "model.c", "model_weights.c", "report.json"} <= {
        p.name for p in out.iterdir()
    }
    assert "arena" in text and "Conv" in text
    code, _, err = invoke(capsys, "emit-c", tmp_path / "missing.onnx", "--out", out)
    assert_one_error_line(code, err, "does not exist")


def test_emit_c_patches_and_ram_budget(run_dir, tmp_path, capsys):
    out = tmp_path / "c"
    code, text, err = invoke(capsys, "emit-c", run_dir / "model.onnx", "--out", out, "--patches", 2)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["patches"]["grid"] == [2, 2]
    assert report["arena_bytes"] < report["memory"]["arena_layer_by_layer_bytes"]
    assert "patches 2x2" in text
    code, _, err = invoke(
        capsys, "emit-c", run_dir / "model.onnx", "--out", tmp_path / "c2", "--ram-budget", 100
    )
    assert_one_error_line(code, err, "ram_budget=100: cannot be met")
    assert not (tmp_path / "c2" / "report.json").exists()


def test_inspect_lists_quantization_sensitivity(capsys):
    code, out, err = invoke(
        capsys, "inspect", "digits:vgg", "--quant-sensitivity", "--data", "digits"
    )
    assert code == 0, err
    table = out.split("int8 sensitivity", 1)[1]
    assert "features.0" in table and "classifier" in table and "SQNR" in table
    code, _, err = invoke(capsys, "inspect", "digits:vgg", "--quant-sensitivity")
    assert code == 2 and "needs --data" in err


def test_every_option_has_help_and_says_its_default():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or action.dest in ("debug", "verbose"):
                continue
            where = f"graphopt {command} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            shown = action.default not in (None, False, [], argparse.SUPPRESS)
            if shown and action.option_strings:
                assert "default" in action.help, f"{where} does not say its default"


def test_passes_name_shows_one_pass(capsys):
    code, out, err = invoke(capsys, "passes", "prune")
    assert code == 0, err
    assert out.startswith("prune  [lossy") and "max-ratio" in out and "fold-bn" not in out
    code, out, err = invoke(capsys, "passes", "prnue")
    assert_one_error_line(code, err, "unknown pass 'prnue'", "did you mean 'prune'")
    code, out, err = invoke(capsys, "run", "--help")
    assert code == 0 and "graphopt passes NAME" in " ".join(out.split())
