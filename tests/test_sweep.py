"""``graphopt sweep``: one row per (ratio, variant), a CSV and a picture."""

from __future__ import annotations

import csv

from graphopt.app import cli
from graphopt.app.staging import MANIFEST


def test_sweep_writes_csv_and_png(digits_cache, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = cli.main(
        [
            "sweep", "digits:vgg", "--data", "digits", "--ratios", "0,0.5", "--runs", "5",
            "--pipeline-template", "fold-bn,prune(ratio={ratio}),distill(epochs=3)",
            "--out", str(out),
        ]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "sweep.csv", "tradeoff.png"]
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["ratio"], r["variant"]) for r in rows] == [
        ("0.0", "prune"),
        ("0.0", "prune+distill"),
        ("0.5", "prune"),
        ("0.5", "prune+distill"),
    ]
    by = {(float(r["ratio"]), r["variant"]): r for r in rows}
    assert int(by[0.5, "prune"]["macs"]) < 0.5 * int(by[0.0, "prune"]["macs"])
    assert by[0.5, "prune+distill"]["macs"] == by[0.5, "prune"]["macs"]
    assert float(by[0.5, "prune+distill"]["top1_ort"]) > float(by[0.5, "prune"]["top1_ort"]) + 0.3
    assert abs(float(by[0.0, "prune"]["top1_ort"]) - 0.99) < 0.02  # ratio 0 prunes nothing
    assert "prune+distill" in text


def test_a_template_without_ratio_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = cli.main(
        [
            "sweep",
            "digits:vgg",
            "--data",
            "digits",
            "--pipeline-template",
            "fold-bn",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "must contain {ratio}" in err
    assert not out.exists()
