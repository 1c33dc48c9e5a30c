"""Pruning attention heads and FFN channels of Hugging Face transformers: graphopt (no head map)
against Torch-Pruning 1.6.1's recipe for HF models (a ``num_heads`` map written by hand, and
``num_attention_heads`` / ``attention_head_size`` / ``all_head_size`` rewritten by hand after
pruning), in the same run.

    pip install torch-pruning==1.6.1     # the peer; not a graphopt dependency
    python benchmarks/prune_transformers.py [--models bert-base,vit-b16] [--rounds 3]
                                            [--torch-pruning-path DIR]

Both tools remove half the heads of every attention layer and half of every FFN, keep the
hidden width (the residual stream), L2 magnitude importance, on ``BertModel`` (BERT-base
config) and ``ViTModel`` (ViT-B/16 config), random weights, batch 1, sequence 128 / 224x224.
graphopt's time is ``graphopt.trace`` + ``Pipeline.parse("prune(ratio=0.5)").run`` (the
export front end, verification on); Torch-Pruning's is ``MetaPruner`` + ``step()`` + the
attribute fix-up. Each round runs each tool in a fresh process (cold, alternating order); the
table gives the median. Columns: heads and parameters left, whether the pruned model runs,
and for graphopt whether a fresh model from the same config with ``apply_plan`` replayed and
the pruned weights loaded computes the pruned graph's output (max relative difference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from cold_process import run_worker

SEQ = 128


def _build(name: str):
    import torch
    import transformers as t

    torch.manual_seed(0)
    if name == "bert-base":
        model = t.BertModel(t.BertConfig())
        x = torch.randint(0, 30522, (1, SEQ))
    elif name == "vit-b16":
        model = t.ViTModel(t.ViTConfig())
        x = torch.randn(1, 3, 224, 224)
    else:
        raise SystemExit(f"unknown model {name!r}; use bert-base or vit-b16")
    return model.eval(), x


def _attention(model) -> list[tuple]:
    """``(attention module, (q, k, v), name of its head-size attribute)`` for both layouts in
    transformers 5 (BERT's ``query``/``attention_head_size``, ViT's ``q_proj``/``head_dim``)."""
    out = []
    for m in model.modules():
        if hasattr(m, "query") and hasattr(m, "attention_head_size"):
            out.append((m, (m.query, m.key, m.value), "attention_head_size"))
        elif hasattr(m, "q_proj") and hasattr(m, "head_dim"):
            out.append((m, (m.q_proj, m.k_proj, m.v_proj), "head_dim"))
    return out


def _heads(model) -> int:
    return sum(qkv[0].out_features // getattr(m, size) for m, qkv, size in _attention(model))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def worker_graphopt(name: str) -> dict:
    import torch

    model, x = _build(name)
    heads0, params0 = _heads(model), _params(model)
    t0 = time.perf_counter()
    import graphopt
    from graphopt.passes.prune import apply_plan

    g = graphopt.trace(model, x)
    res = graphopt.Pipeline.parse("prune(ratio=0.5)").run(g)
    seconds = time.perf_counter() - t0
    report = res.reports[0].details
    heads = sum(h["heads"] - h["removed"] for h in report["heads"])
    with torch.no_grad():
        out = g.module(x)
        out = out["last_hidden_state"] if isinstance(out, dict) else out[0]
    fresh, _ = _build(name)
    apply_plan(fresh, report["plan"])
    fresh.load_state_dict(g.module.state_dict(), strict=False)
    with torch.no_grad():
        again = fresh(x).last_hidden_state
    rel = float((again - out).abs().max() / out.abs().max())
    return {
        "seconds": seconds,
        "heads": f"{heads0} -> {heads}",
        "params": _params(g.module) / params0,
        "runs": True,
        "reload": rel,
    }


def worker_torch_pruning(name: str) -> dict:
    import torch

    model, x = _build(name)
    heads0, params0 = _heads(model), _params(model)
    t0 = time.perf_counter()
    import torch_pruning as tp

    attn = _attention(model)
    num_heads = {}
    for m, qkv, _ in attn:  # the map Torch-Pruning needs, by hand
        for proj in qkv:
            num_heads[proj] = m.num_attention_heads
    # keep the hidden width: the layers writing the residual stream are not pruned
    hidden = [m for n, m in model.named_modules() if n.endswith(("output.dense", "o_proj", "fc2"))]
    ignored = [model.embeddings, getattr(model, "pooler", None), *hidden]
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[m for m in ignored if m is not None],
        output_transform=lambda out: out.last_hidden_state.sum(),
        num_heads=num_heads,
        prune_head_dims=False,
        prune_num_heads=True,
        head_pruning_ratio=0.5,
    )
    pruner.step()
    for m, qkv, size in attn:  # and the attributes the forward reads, by hand
        m.num_attention_heads = pruner.num_heads[qkv[0]]
        setattr(m, size, qkv[0].out_features // m.num_attention_heads)
        if hasattr(m, "all_head_size"):
            m.all_head_size = qkv[0].out_features
    seconds = time.perf_counter() - t0
    try:
        with torch.no_grad():
            model(x)
        runs = True
    except Exception as e:  # noqa: BLE001 - the benchmark reports it
        runs = f"{type(e).__name__}: {str(e)[:60]}"
    return {
        "seconds": seconds,
        "heads": f"{heads0} -> {_heads(model)}",
        "params": _params(model) / params0,
        "runs": runs,
        "reload": None,
    }


def _run(tool: str, name: str, args) -> dict:
    argv = ["--worker", tool, "--models", name]
    if args.torch_pruning_path:
        argv += ["--torch-pruning-path", args.torch_pruning_path]
    result, error = run_worker(__file__, argv, args.timeout, f"{tool} on {name}")
    return result if result is not None else {"failed": error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert-base,vit-b16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--torch-pruning-path", default="")
    ap.add_argument("--worker", choices=("graphopt", "torch-pruning"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_pruning_path:
        sys.path.insert(0, args.torch_pruning_path)
    models = [m for m in args.models.split(",") if m]
    if args.worker:
        import torch

        torch.set_num_threads(1)
        fn = worker_graphopt if args.worker == "graphopt" else worker_torch_pruning
        print(json.dumps(fn(models[0])))
        return
    from graphopt.table import render

    rows = []
    for name in models:
        runs: dict[str, list[dict]] = {"graphopt": [], "torch-pruning": []}
        for r in range(args.rounds):
            order = ("graphopt", "torch-pruning") if r % 2 == 0 else ("torch-pruning", "graphopt")
            for tool in order:
                runs[tool].append(_run(tool, name, args))
        for tool, res in runs.items():
            ok = [x for x in res if x and "failed" not in x]
            if not ok:
                rows.append([name, tool, "failed", "-", "-", "-", res[0]["failed"][:60], ""])
                continue
            last = ok[-1]
            reload = "-" if last["reload"] is None else f"{last['reload']:.1e}"
            rows.append(
                [
                    name,
                    tool,
                    f"{statistics.median(x['seconds'] for x in ok):.2f}",
                    last["heads"],
                    f"{last['params']:.3f}",
                    "yes" if last["runs"] is True else str(last["runs"]),
                    reload,
                    "none" if tool == "graphopt" else "num_heads map + attributes by hand",
                ]
            )
        print(" | ".join(rows[-1]), file=sys.stderr)
    head = [
        "model",
        "tool",
        "s (cold)",
        "heads",
        "params kept",
        "runs",
        "apply_plan reload",
        "head map",
    ]
    print(render(head, rows))


if __name__ == "__main__":
    main()
