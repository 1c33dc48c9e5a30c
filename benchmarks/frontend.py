"""Front-end coverage: which models get in, through which front end, and whether what comes
out is exact and exports to ONNX Runtime.

Rows: torchvision classifiers (random weights) through fx and through torch.export, Hugging
Face models built from small configs (random weights, saved and loaded offline) through
``auto`` (the concrete-value tracer serves them) and through torch.export, and models
with optional arguments, keyword inputs and flags. Columns: front end that served, nodes,
trace time (median of --repeats), torch.export's own time on the same model (the goal: within
2x) both as a user calls it (static shapes) and as graphopt calls it (the batch dimension
dynamic, so the graph runs calibration batches of any size), ``fold-bn,dce`` exact, ORT parity
after export (relative), and whether ``fold-bn,prune(ratio=0.5),qdq`` runs.

    python benchmarks/frontend.py --rows rows.jsonl    # everything; resumes from rows.jsonl
    python benchmarks/frontend.py --only resnet18,hf-bert --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import graphopt
from graphopt.backends.onnxruntime import check_parity, export
from graphopt.cpu import cpu_int8
from graphopt.table import render
from graphopt.zoo.models import load_model


class Flags(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x, embed=False, scale=None):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        if embed:
            return h
        if scale is not None:
            h = h * scale
        return self.fc(h)


class DictIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, image, meta, return_dict=True):
        h = torch.relu(self.a(image) + self.b(meta))
        return {"logits": self.head(h)} if return_dict else self.head(h)


def _hf_specs(root: Path) -> dict[str, str]:
    import transformers as t

    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    configs = {
        "hf-bert": t.BertConfig(vocab_size=1000, hidden_size=64, **small),
        "hf-distilbert": t.DistilBertConfig(
            vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128
        ),
        "hf-vit": t.ViTConfig(image_size=32, patch_size=8, hidden_size=64, **small),
        "hf-gpt2": t.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4),
        "hf-wav2vec2": t.Wav2Vec2Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            conv_dim=(32, 32),
            conv_stride=(5, 4),
            conv_kernel=(10, 4),
            num_conv_pos_embeddings=16,
        ),
    }
    out = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        path = root / name
        t.AutoModel.from_config(cfg).save_pretrained(path)
        out[name] = f"hf:{path}"
    return out


def _models(only: set[str] | None, tmp: Path):
    import torchvision

    rows = []
    for name in torchvision.models.list_models(module=torchvision.models):
        rows.append((name, f"torchvision:{name}", ("fx", "export")))
    rows.append(("flags", Flags().eval(), ("auto",)))
    rows.append(("dict-inputs", DictIn().eval(), ("auto",)))
    if only is None or any(n.startswith("hf") for n in only):
        try:
            for name, spec in _hf_specs(tmp).items():
                rows.append((name, spec, ("auto", "export")))
        except ImportError:
            print("transformers not installed: no Hugging Face rows", file=sys.stderr)
    return [r for r in rows if only is None or r[0] in only]


def _inputs_for(name, model_or_spec):
    if isinstance(model_or_spec, str):
        model, inputs = load_model(model_or_spec)
        return _no_zero_weights(model), inputs
    if name == "flags":
        return model_or_spec, torch.randn(1, 3, 16, 16)
    return model_or_spec, {"image": torch.randn(1, 8), "meta": torch.randn(1, 4)}


def _no_zero_weights(model: nn.Module) -> nn.Module:
    """Give small random values to weights initialised to zero (torchvision's ViT heads), so
    outputs are not all zero and the parity column measures something."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_row(name, spec, frontend, repeats, tmp: Path) -> list[str]:
    model, inputs = _inputs_for(name, spec)
    try:  # the first call warms up (imports, torch's caches); the timed calls follow
        g = graphopt.trace(model, inputs, frontend=frontend)
        t_trace = _median_time(lambda: graphopt.trace(model, inputs, frontend=frontend), repeats)
    except Exception as e:
        return [name, frontend, "FAIL", "-", "-", "-", "-", "-", "-", "-", str(e)[:80]]
    served = g.trace_report.get("frontend", "?")
    t_export = t_dynamic = "-"
    if served in ("concrete", "export"):
        t_export, t_dynamic = _export_times(model, inputs, repeats)
    try:
        r = graphopt.Pipeline.parse("fold-bn,dce").run(g)
        exact = "yes" if all(x.verified or not x.modified for x in r.reports) else "no"
    except Exception as e:
        exact = f"FAIL {type(e).__name__}"
    try:
        path = export(g, tmp / f"{name}-{frontend}.onnx")
        p = check_parity(g, path)
        parity = f"{p['rel']:.1e}"
    except Exception as e:
        parity = f"FAIL {type(e).__name__}"
    data = [g.example_inputs for _ in range(2)]
    try:
        graphopt.Pipeline.parse("fold-bn,prune(ratio=0.5),qdq").run(g, data=data)
        pipeline = "yes"
    except Exception as e:
        pipeline = f"FAIL {str(e)[:60]}"
    nodes = str(len(g.nodes))
    return [
        name,
        frontend,
        served,
        nodes,
        f"{t_trace:.2f}",
        t_export,
        t_dynamic,
        exact,
        parity,
        pipeline,
        "",
    ]


def _export_times(model, inputs, repeats: int) -> tuple[str, str]:
    """torch.export's own time: as a user calls it (static shapes), and as graphopt calls it
    (a batch of two with ``Dim.AUTO`` on dim 0 of every input)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,) if torch.is_tensor(inputs) else ()
    kwargs = inputs if isinstance(inputs, dict) else {}
    out = []
    try:
        out.append(f"{_median_time(lambda: torch.export.export(model, args, kwargs), repeats):.2f}")
    except Exception:
        out.append("fail")
    two = [torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in args]
    kw2 = {k: torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for k, t in kwargs.items()}
    dims = tuple({0: torch.export.Dim.AUTO} for _ in two)
    kdims = {k: {0: torch.export.Dim.AUTO} for k in kw2}
    try:
        t = _median_time(
            lambda: torch.export.export(
                model, tuple(two), kw2, dynamic_shapes=(dims, kdims) if kw2 else dims
            ),
            repeats,
        )
        out.append(f"{t:.2f}")
    except Exception:
        out.append("fail")
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated row names")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--rows", type=Path, default=None, help="a JSON-lines file: rows are appended to it as "
        "they finish and rows already in it are not measured again (resume a long run)"
    )  # fmt: skip
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    torch.set_num_threads(1)
    done: dict[tuple[str, str], list[str]] = {}
    if args.rows is not None and args.rows.exists():
        for line in args.rows.read_text().splitlines():
            row = json.loads(line)
            done[row[0], row[1]] = row
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = []
        for name, spec, frontends in _models(only, tmp):
            for fe in frontends:
                row = done.get((name, fe)) or run_row(name, spec, fe, args.repeats, tmp)
                if (name, fe) not in done and args.rows is not None:
                    with args.rows.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                print(" | ".join(row), file=sys.stderr, flush=True)
                rows.append(row)
    head = [
        "model",
        "asked",
        "served",
        "nodes",
        "trace s",
        "torch.export s",
        "torch.export dyn-batch s",
        "fold-bn,dce exact",
        "ORT rel",
        "fold-bn,prune,qdq",
        "note",
    ]
    print(render(head, rows))
    ok = sum(1 for r in rows if r[2] != "FAIL")
    print(f"\n{ok}/{len(rows)} rows trace; torch {torch.__version__}, CPU {cpu_int8().describe()}")
    for col, label in ((5, "torch.export"), (6, "torch.export with a dynamic batch")):
        ratios = [float(r[4]) / float(r[col]) for r in rows if _num(r[col]) and float(r[col]) > 0]
        if ratios:
            print(
                f"trace time through export / {label}: median {statistics.median(ratios):.2f}x "
                f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x) over {len(ratios)} rows"
            )


def _num(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()
