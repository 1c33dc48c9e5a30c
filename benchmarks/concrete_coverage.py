"""Which models the concrete-value tracer takes, and whether what it captures is exact.

Rows: Hugging Face architectures built from small configs (random weights, saved and loaded
offline through ``hf:PATH``, inputs as the loader makes them) through ``graphopt.trace``'s
``auto`` front end, and every torchvision classifier (random weights) through
``frontend="concrete"``. Columns: the front end that served, trace time (one call, after a
warm-up model), and the largest difference to the eager model, relative to the output's
range, at the example's batch and at a larger one (3 for Hugging Face, 2 for torchvision).

    python benchmarks/concrete_coverage.py                 # both sets
    python benchmarks/concrete_coverage.py --set hf --only llama,t5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import graphopt
from graphopt.table import render
from graphopt.zoo.models import load_model


def _hf_configs() -> dict:
    import transformers as t

    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, hidden_size=32)
    text = dict(vocab_size=99, max_position_embeddings=64)
    kv = dict(num_key_value_heads=2)
    vit = dict(image_size=32, patch_size=8, **small)
    audio = dict(
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, **small,
    )  # fmt: skip
    return {
        "bert": lambda: t.BertConfig(**text, **small),
        "roberta": lambda: t.RobertaConfig(**text, **small),
        "albert": lambda: t.AlbertConfig(vocab_size=99, embedding_size=16, **small),
        "electra": lambda: t.ElectraConfig(vocab_size=99, embedding_size=16, **small),
        "deberta-v2": lambda: t.DebertaV2Config(**text, **small),
        "mpnet": lambda: t.MPNetConfig(vocab_size=99, **small),
        "distilbert": lambda: t.DistilBertConfig(
            vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64
        ),
        "gpt2": lambda: t.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4),
        "gpt-neo": lambda: t.GPTNeoConfig(
            vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
            attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
        ),
        "opt": lambda: t.OPTConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64,
        ),
        "bloom": lambda: t.BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4),
        "llama": lambda: t.LlamaConfig(**text, **small, **kv),
        "mistral": lambda: t.MistralConfig(**text, **small, **kv),
        "qwen2": lambda: t.Qwen2Config(**text, **small, **kv),
        "phi": lambda: t.PhiConfig(**text, **small),
        "gemma": lambda: t.GemmaConfig(**text, **small, **kv, head_dim=8),
        "t5": lambda: t.T5Config(
            vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            decoder_start_token_id=0,
        ),
        "bart": lambda: t.BartConfig(
            vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=64,
        ),
        "vit": lambda: t.ViTConfig(**vit),
        "deit": lambda: t.DeiTConfig(**vit),
        "beit": lambda: t.BeitConfig(**vit),
        "dinov2": lambda: t.Dinov2Config(**vit),
        "clip-vision": lambda: t.CLIPVisionConfig(**vit),
        "swin": lambda: t.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
            window_size=4,
        ),
        "convnext": lambda: t.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32
        ),
        "resnet": lambda: t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
        "mobilevit": lambda: t.MobileViTConfig(
            image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64]
        ),
        "segformer": lambda: t.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
            num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2],
        ),
        "wav2vec2": lambda: t.Wav2Vec2Config(**audio),
        "hubert": lambda: t.HubertConfig(**audio),
        "whisper": lambda: t.WhisperConfig(
            vocab_size=99, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=1,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        ),
    }  # fmt: skip


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out
    return [v for v in values if isinstance(v, torch.Tensor)]


def _row(name: str, model, inputs, frontend: str, bigger: int) -> list[str]:
    t0 = time.perf_counter()
    try:
        g = graphopt.trace(model, inputs, frontend=frontend)
    except Exception as e:  # noqa: BLE001 - the table reports it
        return ["FAIL", name, "-", "-", "-", str(e)[:90]]
    seconds = time.perf_counter() - t0
    errors = []
    with torch.no_grad():
        for b in (1, bigger):
            xs = tuple(torch.cat([x] * b) for x in inputs)
            got, want = _tensors(g.module(*xs)), _tensors(model(*xs))
            errors.append(
                max(float((p - q).abs().max() / (q.abs().max() + 1e-12)) for p, q in zip(got, want))
            )
    rep = g.trace_report
    note = "; ".join(f[:70] for f in rep["fallbacks"] if not f.startswith("fx:"))
    return [rep["frontend"], name, f"{seconds:.2f}", f"{errors[0]:.1e}", f"{errors[1]:.1e}", note]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=("hf", "torchvision", "both"), default="both")
    ap.add_argument("--only", default=None, help="comma-separated names")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    torch.set_num_threads(1)
    rows = []
    if args.set in ("hf", "both"):
        import transformers as t

        t.logging.set_verbosity_error()
        with tempfile.TemporaryDirectory() as d:
            for name, make in _hf_configs().items():
                if only and name not in only:
                    continue
                torch.manual_seed(0)
                path = Path(d) / name
                t.AutoModel.from_config(make()).save_pretrained(path)
                model, inputs = load_model(f"hf:{path}")
                rows.append(["hf", *_row(name, model, inputs, "auto", 3)])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    if args.set in ("torchvision", "both"):
        import torchvision

        for name in torchvision.models.list_models(module=torchvision.models):
            if only and name not in only:
                continue
            model, x = load_model(f"torchvision:{name}")
            inputs = x if isinstance(x, tuple) else (x,)
            rows.append(["torchvision", *_row(name, model, inputs, "concrete", 2)])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    head = ["set", "served", "model", "trace s", "rel err (example)", "rel err (bigger)", "note"]
    print(render(head, [[r[0], r[1], r[2], *r[3:]] for r in rows]))
    exact = sum(1 for r in rows if r[1] != "FAIL" and max(float(r[4]), float(r[5])) < 1e-5)
    served = sum(1 for r in rows if r[1] == "concrete")
    print(f"\n{served}/{len(rows)} served by the concrete tracer; {exact} exact (< 1e-5)")


if __name__ == "__main__":
    main()
