"""Pruning a transformer's hidden width (``prune(units=hidden)``): the embeddings, every
LayerNorm/RMSNorm, the residual stream and the head's input shrink together, on classifiers
nobody here wrote (Hugging Face BERT, DistilBERT, ViT, GPT-2, Llama built from configs, and
torchvision's VisionTransformer).

A norm over fewer channels normalises with statistics of fewer channels, so zeroing channels
first is no ground truth here. The ground truth is a smaller model of the same family: a Llama
with ``hidden_size`` halved (its head size is a config field of its own), loaded with the
original weights restricted to the kept channels, must compute what the pruned graph computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import graphopt
from graphopt.backends.onnxruntime import check_parity, export
from graphopt.channels import ChannelAnalysis
from graphopt.errors import OptionError
from passes.prune import apply_plan

transformers = pytest.importorskip("transformers")

E, H, FFN, LAYERS, LABELS = 32, 4, 64, 2, 3


def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(1, 99, (batch, 12), generator=torch.Generator().manual_seed(1))


def _bert():
    t = transformers
    cfg = t.BertConfig(
        vocab_size=99, hidden_size=E, num_hidden_layers=LAYERS, num_attention_heads=H,
        intermediate_size=FFN, max_position_embeddings=32, num_labels=LABELS,
    )  # fmt: skip
    return t.BertForSequenceClassification(cfg), {"input_ids": _ids()}


def _distilbert():
    t = transformers
    cfg = t.DistilBertConfig(
        vocab_size=99, dim=E, n_layers=LAYERS, n_heads=H, hidden_dim=FFN,
        max_position_embeddings=32, num_labels=LABELS,
    )  # fmt: skip
    return t.DistilBertForSequenceClassification(cfg), {"input_ids": _ids()}


def _vit():
    t = transformers
    cfg = t.ViTConfig(
        image_size=16, patch_size=4, hidden_size=E, num_hidden_layers=LAYERS,
        num_attention_heads=H, intermediate_size=FFN, num_labels=LABELS,
    )  # fmt: skip
    return t.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 16, 16)}


def _gpt2():
    t = transformers
    cfg = t.GPT2Config(
        vocab_size=99, n_embd=E, n_layer=LAYERS, n_head=H, n_positions=32, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, num_labels=LABELS,
    )  # fmt: skip
    return t.GPT2ForSequenceClassification(cfg), {"input_ids": _ids()}


def _llama_config(hidden: int):
    return transformers.LlamaConfig(
        vocab_size=99, hidden_size=hidden, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=H, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=LABELS,
    )  # fmt: skip


def _llama():
    return transformers.LlamaForSequenceClassification(_llama_config(E)), {"input_ids": _ids()}


def _torchvision_vit():
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=LAYERS, num_heads=H, hidden_dim=E, mlp_dim=FFN,
        num_classes=LABELS,
    )  # fmt: skip
    return model, torch.randn(2, 3, 16, 16)


# name: (builder, a module path whose input width is the hidden width, a norm's path)
MODELS = {
    "bert": (_bert, "bert.pooler.dense", "bert.encoder.layer.1.output.LayerNorm"),
    "distilbert": (_distilbert, "pre_classifier", "distilbert.transformer.layer.1.output_layer_norm"),
    "vit": (_vit, "classifier", "vit.layernorm"),
    "gpt2": (_gpt2, "score", "transformer.ln_f"),
    "llama": (_llama, "score", "model.norm"),
    "torchvision-vit": (_torchvision_vit, "heads.head", "encoder.ln"),
}  # fmt: skip


def _trace(name: str):
    torch.manual_seed(0)
    model, inputs = MODELS[name][0]()
    model.eval()
    return model, inputs, graphopt.trace(model, inputs)


def _call(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = module(**inputs) if isinstance(inputs, dict) else module(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if isinstance(out, dict) else out[0]


def _width(module, path: str) -> int:
    m = module.get_submodule(path)
    return m.in_features if hasattr(m, "in_features") else m.weight.shape[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_hidden_width_is_one_prunable_group(name):
    _, _, g = _trace(name)
    ca = ChannelAnalysis(g)
    hidden = [grp for grp in ca.groups if grp.stats_coupled and not grp.heads]
    assert [grp.size for grp in hidden] == [E], ca.locked_summary()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_units_hidden_prunes_only_the_hidden_width(name, tmp_path):
    model, inputs, g = _trace(name)
    _, head, norm = MODELS[name]
    ffn_before = {
        n: p.shape for n, p in g.module.named_parameters() if p.dim() == 2 and FFN in p.shape
    }
    r = graphopt.Pipeline.parse("prune(ratio=0.5,units=hidden)").run(g)
    m = r.graph.module
    assert _width(m, head) == E // 2 and _width(m, norm) == E // 2
    assert r.reports[0].details["heads"] == []  # no head went
    for n, shape in ffn_before.items():  # FFN widths kept: only the hidden side halves
        got = m.get_parameter(n).shape
        assert FFN in got and got.numel() == shape.numel() // 2, (n, shape, got)
    x = tuple(inputs.values()) if isinstance(inputs, dict) else (inputs,)
    three = tuple(torch.cat([t, t[:1]]) for t in x)  # another batch size
    assert _call(m, dict(zip(inputs, three)) if isinstance(inputs, dict) else three[0]).shape == (
        3,
        LABELS,
    )
    parity = check_parity(r.graph, export(r.graph, tmp_path / f"{name}.onnx"))
    assert parity["rel"] < 1e-4, parity


@pytest.mark.parametrize("name", ["bert", "vit", "llama"])
def test_the_hidden_plan_replays_on_a_fresh_model(name):
    model, inputs, g = _trace(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = graphopt.Pipeline.parse("prune(ratio=0.5,units=hidden)").run(g)
    torch.manual_seed(1)
    fresh = MODELS[name][0]()[0].eval()
    fresh.load_state_dict(state)
    apply_plan(fresh, r.reports[0].details["plan"])
    assert _width(fresh, MODELS[name][1]) == E // 2
    want, got = _call(r.graph.module, inputs), _call(fresh, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _kept_hidden(plan: dict, owner: str, param: str, dim: int) -> np.ndarray:
    (removed,) = [
        e["removed"]
        for rnd in plan["rounds"]
        for e in rnd["members"]
        if (e["owner"], e["param"], e["dim"]) == (owner, param, dim)
    ]
    return np.setdiff1d(np.arange(E), removed)


def test_a_pruned_llama_computes_what_a_smaller_llama_computes():
    """Ground truth: ``LlamaForSequenceClassification`` built with ``hidden_size=E/2`` (same head
    size and FFN width) and loaded with the original weights restricted to the kept hidden
    channels. RMSNorm then averages over the kept channels, as the pruned graph must."""
    model, inputs, g = _trace("llama")
    r = graphopt.Pipeline.parse("prune(ratio=0.5,units=hidden,importance=l1)").run(g)
    keep = torch.as_tensor(
        _kept_hidden(r.reports[0].details["plan"], "model.embed_tokens", "weight", 1)
    )
    assert len(keep) == E // 2
    small = transformers.LlamaForSequenceClassification(_llama_config(E // 2)).eval()
    sliced = {}
    for k, v in model.state_dict().items():
        want = small.state_dict()[k].shape
        for d in range(v.dim()):
            if v.shape[d] == E and want[d] == E // 2:
                v = v.index_select(d, keep)
        assert v.shape == want, k
        sliced[k] = v
    small.load_state_dict(sliced)
    torch.testing.assert_close(
        _call(r.graph.module, inputs), _call(small, inputs), rtol=1e-5, atol=1e-6
    )


def test_unit_kinds_combine_and_bad_kinds_are_named():
    _, _, g = _trace("bert")
    r = graphopt.Pipeline.parse("prune(ratio=0.5,units=heads+channels)").run(g)
    m = r.graph.module
    assert _width(m, "bert.pooler.dense") == E  # the hidden width stays
    layer = "bert.encoder.layer.0"
    assert m.get_submodule(f"{layer}.attention.self.query").out_features == E // 2
    assert m.get_submodule(f"{layer}.intermediate.dense").out_features == FFN // 2
    with pytest.raises(
        OptionError, match=r"units must be all or kinds joined by '\+'.*'heads\+ffn'"
    ):
        graphopt.Pipeline.parse("prune(units=heads+ffn)")
