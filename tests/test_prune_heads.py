"""Attention-head pruning on transformers nobody here wrote: Hugging Face BERT, DistilBERT and
ViT built from configs (random weights, no download), ``nn.TransformerEncoder`` (traced by
``torch.export``: its ``nn.MultiheadAttention`` arrives as ``aten.linear`` on
``in_proj_weight`` and ``[T, B·H, D]`` views), a hand-written SDPA block, grouped-query
attention and nanoGPT-style code.

Ground truth: silence a head (zero its columns of the output projection and its rows of v),
then remove exactly that head: the outputs must not move (relative error < 1e-5). If the
analysis coupled the wrong rows of q, k or v to a head, or a shape constant were left stale,
they would.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.backends.onnxruntime import check_parity, export
from graphopt.channels import ChannelAnalysis
from graphopt.channels.surgery import apply_plan, member_tensor, remove_units
from graphopt.errors import GraphoptError

from .channel_helpers import zero_unit_inputs

transformers = pytest.importorskip("transformers")

E, H, D, LAYERS = 64, 4, 16, 2


class SDPABlock(nn.Module):
    """The textbook block: ``view(B, T, H, D).transpose(1, 2)``, SDPA, and back."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(E, 2 * E), nn.Linear(2 * E, E)
        self.ln = nn.LayerNorm(E)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q(x).view(B, T, H, C // H).transpose(1, 2)
        k = self.k(x).view(B, T, H, C // H).transpose(1, 2)
        v = self.v(x).view(B, T, H, C // H).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, H * (C // H)))
        return self.ln(x + self.fc2(F.gelu(self.fc1(x))))


class SDPAModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(SDPABlock(), SDPABlock())

    def forward(self, x):
        return self.layers(x)


class GQABlock(nn.Module):
    """Grouped-query attention: 4 query heads read 2 key/value heads."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode, self.hk = mode, 2
        self.q, self.o = nn.Linear(E, H * D), nn.Linear(H * D, E)
        self.k, self.v = nn.Linear(E, self.hk * D), nn.Linear(E, self.hk * D)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, H, D).transpose(1, 2)
        k = self.k(x).view(B, T, self.hk, D).transpose(1, 2)
        v = self.v(x).view(B, T, self.hk, D).transpose(1, 2)
        g = H // self.hk
        if self.mode == "repeat_interleave":
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        elif self.mode == "expand":  # Hugging Face's repeat_kv
            k = k[:, :, None].expand(B, self.hk, g, T, D).reshape(B, H, T, D)
            v = v[:, :, None].expand(B, self.hk, g, T, D).reshape(B, H, T, D)
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.mode == "enable_gqa")
        return x + self.o(a.transpose(1, 2).reshape(B, T, H * D))


class NanoGPTBlock(nn.Module):
    """Packed qkv split by the width read from the input, and ``view(B, T, C)`` back."""

    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def _ids():
    return torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(1))


def _bert():
    cfg = transformers.BertConfig(
        hidden_size=E, num_hidden_layers=LAYERS, num_attention_heads=H, intermediate_size=128,
        vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(cfg), {"input_ids": _ids()}


def _distilbert():
    cfg = transformers.DistilBertConfig(
        vocab_size=100, dim=E, n_layers=LAYERS, n_heads=H, hidden_dim=128,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.DistilBertModel(cfg), {"input_ids": _ids()}


def _vit():
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=E, num_hidden_layers=LAYERS,
        num_attention_heads=H, intermediate_size=128,
    )  # fmt: skip
    return transformers.ViTModel(cfg), {"pixel_values": torch.randn(1, 3, 16, 16)}


def _encoder():
    layer = nn.TransformerEncoderLayer(E, H, 128, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, LAYERS), torch.randn(2, 16, E)


# name: (builder, q/k/v/o module paths of layer {i} (None: packed in_proj), v's path)
MODELS = {
    "bert": (_bert, "encoder.layer.{i}.attention.self.{p}", "encoder.layer.{i}.attention.output.dense"),
    "distilbert": (_distilbert, "transformer.layer.{i}.attention.{p}_lin", "transformer.layer.{i}.attention.out_lin"),
    "vit": (_vit, "layers.{i}.attention.{p}_proj", "layers.{i}.attention.o_proj"),
    "sdpa": (lambda: (SDPAModel(), torch.randn(2, 16, E)), "layers.{i}.{p}", "layers.{i}.o"),
    "encoder": (_encoder, None, "layers.{i}.self_attn.out_proj"),
}  # fmt: skip
_QKV = {"bert": ("query", "key", "value")}


def _trace(name: str) -> tuple[graphopt.Graph, tuple]:
    torch.manual_seed(0)
    model, inputs = MODELS[name][0]()
    g = graphopt.trace(model.eval(), inputs)
    return g, tuple(inputs.values()) if isinstance(inputs, dict) else (inputs,)


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _run(g: graphopt.Graph, x: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return _outputs(g.module(*x))


def _rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    assert [t.shape for t in got] == [t.shape for t in want]
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))


def _head_groups(ca: ChannelAnalysis) -> list:
    return [g for g in ca.groups if g.heads]


def _silence(g: graphopt.Graph, ca: ChannelAnalysis, units: np.ndarray, rows: bool) -> None:
    """Zero the output-projection columns of the given heads and their v rows (``rows``:
    every q, k and v row and bias of them too, so they also rank lowest)."""
    for m in ca.members:
        idx = np.nonzero(np.isin(ca.units_of(m), units))[0]
        if m.kind == "out" and not rows:
            n = member_tensor(g.module, m).shape[m.dim]
            is_v = m.owner.split(".")[-1] in ("value", "v_lin", "v_proj", "v")
            is_v = is_v or m.param.startswith("in_proj")
            idx = idx[idx >= 2 * n // 3] if m.param.startswith("in_proj") else idx
            if not is_v:
                continue
        elif m.kind not in ("in", "out"):
            continue
        if len(idx):
            with torch.no_grad():
                member_tensor(g.module, m).index_fill_(m.dim, torch.as_tensor(idx), 0.0)


def _two_heads_per_layer(ca: ChannelAnalysis) -> np.ndarray:
    return np.concatenate([grp.units[[0, 2]] for grp in _head_groups(ca)])


def _weights(g: graphopt.Graph, name: str, i: int) -> dict[str, tuple[int, ...]]:
    _, qkv, o = MODELS[name]
    m = g.module
    if qkv is None:
        attn = m.get_submodule(f"layers.{i}.self_attn")
        return {"in_proj": tuple(attn.in_proj_weight.shape), "o": tuple(attn.out_proj.weight.shape)}
    names = _QKV.get(name, ("q", "k", "v"))
    out = {
        p: tuple(m.get_submodule(qkv.format(i=i, p=n)).weight.shape) for p, n in zip("qkv", names)
    }
    return {**out, "o": tuple(m.get_submodule(o.format(i=i)).weight.shape)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_heads_are_units_not_locks(name):
    g, _ = _trace(name)
    ca = ChannelAnalysis(g)
    groups = _head_groups(ca)
    assert [grp.size for grp in groups] == [H] * LAYERS, ca.locked_summary()
    assert not any("not preserved" in r["reason"] for r in ca.locked_summary(limit=0))
    ffn = [grp for grp in ca.groups if not grp.heads]
    assert [grp.size for grp in ffn] == [128] * LAYERS  # FFN widths stay prunable


@pytest.mark.parametrize("name", sorted(MODELS))
def test_removing_silenced_heads_is_exact(name):
    g, x = _trace(name)
    ca = ChannelAnalysis(g)
    units = _two_heads_per_layer(ca)
    _silence(g, ca, units, rows=False)
    ref = _run(g, x)
    remove_units(g, ca, units)
    assert _rel_error(_run(g, x), ref) < 1e-5
    kept = (H - 2) * D
    for i in range(LAYERS):
        w = _weights(g, name, i)
        if "in_proj" in w:
            assert w == {"in_proj": (3 * kept, E), "o": (E, kept)}
        else:
            assert w == {"q": (kept, E), "k": (kept, E), "v": (kept, E), "o": (E, kept)}
    bigger = tuple(torch.cat([t] * 3) for t in x)  # the rewritten shape constants hold there too
    assert _outputs(g.module(*bigger))[0].shape[0] == 3 * x[0].shape[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_pass_removes_the_weakest_heads_exactly_and_exports(name, tmp_path):
    g, x = _trace(name)
    ca = ChannelAnalysis(g)
    units = _two_heads_per_layer(ca)
    _silence(g, ca, units, rows=True)
    ref = _run(g, x)
    members = [ca.members[i] for i in _head_groups(ca)[0].members]
    q0 = next(m for m in members if m.kind == "out" and m.param.endswith("weight"))
    want_rows = np.nonzero(np.isin(ca.units_of(q0), units))[0].tolist()
    r = graphopt.Pipeline.parse("prune(ratio=0.5,units=heads)").run(g)
    rep = r.reports[0].details
    plan = rep["plan"]["rounds"][0]["members"]
    removed = next(e for e in plan if (e["owner"], e["param"], e["dim"]) == (q0.owner, q0.param, 0))
    assert removed["removed"] == want_rows  # exactly the silenced heads went
    assert [(h["heads"], h["removed"]) for h in rep["heads"]] == [(H, 2)] * LAYERS
    assert "attention heads 8 -> 4" in rep["summary"]
    assert _rel_error(_run(r.graph, x), ref) < 1e-5
    path = export(r.graph, tmp_path / f"{name}.onnx")
    parity = check_parity(r.graph, path)
    assert parity["ok"], parity


@pytest.mark.parametrize("mode", ["repeat_interleave", "expand", "enable_gqa"])
def test_grouped_query_attention_removes_whole_query_groups(mode):
    x = torch.randn(2, 16, E)
    g = graphopt.trace(GQABlock(mode).eval(), x)
    ca = ChannelAnalysis(g)
    (grp,) = _head_groups(ca)
    assert grp.size == 2  # a unit: one key/value head and the 2 query heads that read it
    uq = ca.units_of(next(m for m in ca.members if (m.owner, m.kind) == ("q", "out")))
    uk = ca.units_of(next(m for m in ca.members if (m.owner, m.kind) == ("k", "out")))
    np.testing.assert_array_equal(uq, np.repeat(uk[::D], 2 * D))  # query head h -> kv h // 2
    _silence(g, ca, grp.units[:1], rows=False)
    ref = _run(g, (x,))
    remove_units(g, ca, grp.units[:1])
    assert _rel_error(_run(g, (x,)), ref) < 1e-5
    m = g.module
    assert (m.q.out_features, m.k.out_features, m.v.out_features) == (2 * D, D, D)
    assert m.o.in_features == 2 * D


def test_ratio_rounding_is_reported():
    g, x = _trace("bert")
    r = graphopt.Pipeline.parse("prune(ratio=0.3,units=heads)").run(g)
    rep = r.reports[0].details
    assert [(h["layer"], h["removed"]) for h in rep["heads"]] == [
        (f"encoder.layer.{i}.attention.self", 1) for i in range(LAYERS)
    ]
    assert all(h["rounded"] == "ratio 0.3 of 4 heads is 1.2; removed 1" for h in rep["heads"])
    assert "rounded down" in rep["summary"]
    assert _weights(r.graph, "bert", 0)["q"] == (3 * D, E)
    assert _run(r.graph, x)[0].shape == (1, 16, E)


def test_a_layer_losing_every_head_is_refused_by_name():
    g, _ = _trace("bert")
    ca = ChannelAnalysis(g)
    first = _head_groups(ca)[0]
    with pytest.raises(
        GraphoptError, match=r"all 4 attention heads of .*encoder\.layer\.0\.attention\.self\.query"
    ):
        remove_units(g, ca, first.units)


def test_units_option_prunes_heads_or_channels_only():
    g, _ = _trace("distilbert")
    r = graphopt.Pipeline.parse("prune(ratio=0.5,units=channels)").run(g)
    m = r.graph.module
    assert m.get_submodule("transformer.layer.0.attention.q_lin").out_features == E
    assert m.get_submodule("transformer.layer.0.ffn.lin1").out_features == 64
    assert r.reports[0].details["heads"] == []
    g, _ = _trace("distilbert")
    r = graphopt.Pipeline.parse("prune(ratio=0.5,units=heads)").run(g)
    m = r.graph.module
    assert m.get_submodule("transformer.layer.0.attention.q_lin").out_features == E // 2
    assert m.get_submodule("transformer.layer.0.ffn.lin1").out_features == 128


def test_taylor_importance_scores_heads():
    g, x = _trace("sdpa")
    data = [(torch.randn(2, 16, E),) for _ in range(2)]
    r = graphopt.Pipeline.parse("prune(ratio=0.5,importance=taylor,units=heads)").run(g, data=data)
    assert [(h["heads"], h["removed"]) for h in r.reports[0].details["heads"]] == [(H, 2)] * 2
    assert r.graph.module.get_submodule("layers.0.q").out_features == E // 2
    assert _run(r.graph, x)[0].shape == x[0].shape


def test_a_width_read_from_the_input_becomes_a_constant():
    """nanoGPT's ``view(B, T, C)`` reads ``C`` from the (locked) input: after pruning, the
    merged head width is written as the new constant."""
    x = torch.randn(2, 16, E)
    g = graphopt.trace(NanoGPTBlock().eval(), x)
    ca = ChannelAnalysis(g)
    (grp,) = _head_groups(ca)
    _silence(g, ca, grp.units[:1], rows=True)
    ref = _run(g, (x,))
    remove_units(g, ca, grp.units[:1])
    assert _rel_error(_run(g, (x,)), ref) < 1e-5
    assert g.module.c_attn.out_features == 3 * (E - D)
    view = [n for n in g.module.graph.nodes if n.target == "view"][-1]
    assert view.args[-1] == E - D
    assert _run(g, (torch.randn(5, 16, E),))[0].shape == (5, 16, E)


def test_llama_grouped_query_heads_with_rotary_embeddings():
    """Llama: 4 query heads over 2 key/value heads (``repeat_kv``-free SDPA with GQA), rotary
    embeddings slicing the head width (kept whole) and RMSNorm: a unit is a key/value head and
    its two query heads."""
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=E, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=H, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    x = (_ids(),)
    g = graphopt.trace(transformers.LlamaModel(cfg).eval(), {"input_ids": x[0]})
    ca = ChannelAnalysis(g)
    assert [grp.size for grp in _head_groups(ca)] == [2] * LAYERS
    units = np.concatenate([grp.units[:1] for grp in _head_groups(ca)])
    _silence(g, ca, units, rows=True)
    ref = _run(g, x)
    remove_units(g, ca, units)
    assert _rel_error(_run(g, x), ref) < 1e-5
    attn = g.module.get_submodule("layers.0.self_attn")
    assert attn.q_proj.out_features == 2 * D and attn.k_proj.out_features == D
    assert attn.o_proj.in_features == 2 * D


def test_the_plan_replays_on_a_fresh_hugging_face_model():
    """Hugging Face reshapes with ``-1`` heads, so a fresh BertModel with the plan applied (heads
    and FFN widths) computes what the pruned graph computes."""
    torch.manual_seed(0)
    model, inputs = _bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = graphopt.trace(model.eval(), inputs)
    r = graphopt.Pipeline.parse("prune(ratio=0.5)").run(g)
    fresh, _ = _bert()
    fresh.load_state_dict(state)
    apply_plan(fresh.eval(), r.reports[0].details["plan"])
    assert fresh.encoder.layer[0].attention.self.query.out_features == E // 2
    assert fresh.encoder.layer[0].intermediate.dense.out_features == 64
    with torch.no_grad():
        want = _run(r.graph, tuple(inputs.values()))
        got = _outputs(fresh(**inputs))
    assert _rel_error(got, want) < 1e-6


# -- GPT-2: Hugging Face's Conv1D (W: [in, out], y = x @ W + b, an addmm between two views) ----------
def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=100, n_embd=E, n_layer=LAYERS, n_head=H, n_positions=64, use_cache=False
    )
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg).eval()
    return model, {"input_ids": _ids()}


def _gpt2_graph() -> tuple[graphopt.Graph, tuple]:
    model, inputs = _gpt2()
    return graphopt.trace(model, inputs), tuple(inputs.values())


def _gpt2_shapes(g: graphopt.Graph, i: int) -> list[tuple[int, ...]]:
    return [
        tuple(g.module.get_submodule(f"h.{i}.{p}").weight.shape)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]


def test_gpt2_conv1d_heads_and_ffn_are_units():
    g, _ = _gpt2_graph()
    ca = ChannelAnalysis(g)
    assert [(grp.size, grp.heads) for grp in ca.groups] == [(H, True), (4 * E, False)] * LAYERS
    assert [grp.producers for grp in ca.groups if grp.heads] == [
        [f"h.{i}.attn.c_attn"] for i in range(LAYERS)
    ]


def test_gpt2_removing_silenced_heads_and_ffn_is_exact(tmp_path):
    g, x = _gpt2_graph()
    ca = ChannelAnalysis(g)
    units = np.concatenate(
        [grp.units[[0, 2]] if grp.heads else grp.units[::2] for grp in ca.groups]
    )
    zero_unit_inputs(g, ca, units)  # the c_proj rows reading them
    ref = _run(g, x)
    remove_units(g, ca, units)
    assert _rel_error(_run(g, x), ref) < 1e-5
    kept = (H - 2) * D
    for i in range(LAYERS):  # Conv1D weights are [in, out]
        assert _gpt2_shapes(g, i) == [(E, 3 * kept), (kept, E), (E, 2 * E), (2 * E, E)]
    bigger = tuple(torch.cat([t] * 3) for t in x)
    assert _run(g, bigger)[0].shape == (3, 16, E)
    parity = check_parity(g, export(g, tmp_path / "gpt2.onnx"))
    assert parity["ok"], parity


def test_gpt2_the_pass_removes_the_weakest_heads_and_channels():
    g, x = _gpt2_graph()
    ca = ChannelAnalysis(g)
    units = np.concatenate(
        [grp.units[[1, 3]] if grp.heads else grp.units[1::2] for grp in ca.groups]
    )
    for m in ca.members:  # silence them everywhere so they rank lowest
        idx = np.nonzero(np.isin(ca.units_of(m), units))[0]
        if m.kind in ("in", "out") and len(idx):
            with torch.no_grad():
                member_tensor(g.module, m).index_fill_(m.dim, torch.as_tensor(idx), 0.0)
    ref = _run(g, x)
    r = graphopt.Pipeline.parse("prune(ratio=0.5)").run(g)
    rep = r.reports[0].details
    assert [(h["heads"], h["removed"]) for h in rep["heads"]] == [(H, 2)] * LAYERS
    assert _rel_error(_run(r.graph, x), ref) < 1e-5
    members = rep["plan"]["rounds"][0]["members"]
    plan = {(e["owner"], e["param"], e["dim"]): e["removed"] for e in members}
    assert plan[("h.0.attn.c_proj", "weight", 0)] == [*range(D, 2 * D), *range(3 * D, 4 * D)]
    assert plan[("h.0.mlp.c_fc", "weight", 1)] == list(range(1, 4 * E, 2))


def test_gpt2_ffn_plan_replays_on_a_fresh_model():
    """The FFN plan replays on a fresh GPT2Model: its Conv1D's ``nf`` follows the weight."""
    model, inputs = _gpt2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = graphopt.Pipeline.parse("prune(ratio=0.5,units=channels)").run(
        graphopt.trace(model, inputs)
    )
    fresh, _ = _gpt2()
    fresh.load_state_dict(state)
    apply_plan(fresh, r.reports[0].details["plan"])
    assert fresh.h[0].mlp.c_fc.nf == 2 * E and fresh.h[0].mlp.c_proj.nx == 2 * E
    with torch.no_grad():
        got = _outputs(fresh(**inputs))
    assert _rel_error(got, _run(r.graph, tuple(inputs.values()))) < 1e-6


def test_gpt2_head_plan_replays_on_a_fresh_model():
    """The head plan replays on a fresh GPT2Model: ``split_size`` follows the packed c_attn."""
    model, inputs = _gpt2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = graphopt.Pipeline.parse("prune(ratio=0.5,units=heads)").run(graphopt.trace(model, inputs))
    fresh, _ = _gpt2()
    fresh.load_state_dict(state)
    apply_plan(fresh, r.reports[0].details["plan"])
    attn = fresh.h[0].attn
    assert attn.c_attn.nf == 3 * attn.split_size and attn.split_size == E // 2
    assert attn.num_heads * attn.head_dim == attn.split_size
    with torch.no_grad():
        got = _outputs(fresh(**inputs))
    assert _rel_error(got, _run(r.graph, tuple(inputs.values()))) < 1e-6


class Conv1DMLP(nn.Module):
    """Hand-written code using Hugging Face's ``Conv1D`` (fx traces into its forward:
    ``addmm`` between ``view(-1, in)`` and ``view(x.size()[:-1] + (nf,))``)."""

    def __init__(self):
        super().__init__()
        conv1d = transformers.pytorch_utils.Conv1D
        self.up, self.down = conv1d(4 * E, E), conv1d(E, 4 * E)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


@pytest.mark.parametrize("frontend", ["fx", "concrete", "export"])
def test_conv1d_prunes_through_every_front_end(frontend):
    torch.manual_seed(0)
    x = torch.randn(2, 8, E)
    g = graphopt.trace(Conv1DMLP().eval(), x, frontend=frontend)
    ca = ChannelAnalysis(g)
    (grp,) = ca.groups
    assert grp.producers == ["up"] and grp.size == 4 * E
    zero_unit_inputs(g, ca, grp.units[::2])
    ref = _run(g, (x,))
    remove_units(g, ca, grp.units[::2])
    assert _rel_error(_run(g, (x,)), ref) < 1e-5
    assert tuple(g.module.up.weight.shape) == (E, 2 * E)
    assert _run(g, (torch.randn(3, 8, E),))[0].shape == (3, 8, E)  # the rewritten nf holds


def _data_like(x: tuple, n: int = 3) -> list[tuple]:
    """``n`` random batches of two samples shaped like the example inputs."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        out.append(
            tuple(
                torch.randint(0, 100, (2, *t.shape[1:]), generator=gen)
                if not t.is_floating_point()
                else torch.randn((2, *t.shape[1:]), generator=gen)
                for t in x
            )
        )
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_activation_importance_finds_the_heads_whose_output_is_zero(name):
    """A head whose v rows and bias are zero outputs exactly zero on any input: its
    attention-output norm is 0 and every other head's is positive, so
    ``importance=activation`` must remove exactly those heads, leaving the outputs unchanged,
    even where their output-projection columns are large enough that ``l2`` keeps them."""
    g, x = _trace(name)
    ca = ChannelAnalysis(g)
    units = _two_heads_per_layer(ca)
    _silence(g, ca, units, rows=False)
    for m in ca.members:  # large output-projection columns: by weights, these heads matter most
        idx = np.nonzero(np.isin(ca.units_of(m), units))[0]
        if m.kind == "in" and len(idx):
            with torch.no_grad():
                t = member_tensor(g.module, m)
                t.index_copy_(m.dim, torch.as_tensor(idx), torch.randn_like(t).index_select(
                    m.dim, torch.as_tensor(idx)) * 10)  # fmt: skip
    ref = _run(g, x)
    members = [ca.members[i] for i in _head_groups(ca)[0].members]
    q0 = next(m for m in members if m.kind == "out" and m.param.endswith("weight"))
    want_rows = np.nonzero(np.isin(ca.units_of(q0), units))[0].tolist()
    l2 = graphopt.Pipeline.parse("prune(ratio=0.5,units=heads)").run(g.copy())
    l2_plan = l2.reports[0].details["plan"]["rounds"][0]["members"]
    l2_removed = next(
        e for e in l2_plan if (e["owner"], e["param"], e["dim"]) == (q0.owner, q0.param, 0)
    )
    assert l2_removed["removed"] != want_rows  # the weights alone point elsewhere
    r = graphopt.Pipeline.parse("prune(ratio=0.5,units=heads,importance=activation)").run(
        g, data=_data_like(x)
    )
    plan = r.reports[0].details["plan"]["rounds"][0]["members"]
    removed = next(e for e in plan if (e["owner"], e["param"], e["dim"]) == (q0.owner, q0.param, 0))
    assert removed["removed"] == want_rows
    assert _rel_error(_run(r.graph, x), ref) < 1e-5
