"""MiniLM-style distillation for transformers: the self-attention relation loss and the
automatic choice of the teacher's last query/key/value projections, on a Hugging Face BERT
built from a config (random weights) whose heads were pruned."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import OptionError
from graphopt.passes.distill.features import attention_pairs
from graphopt.passes.distill.losses import relation_heads, relation_loss, self_relation

transformers = pytest.importorskip("transformers")


def test_relation_loss_ground_truths():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 24)
    assert relation_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    # the relation of a head only sees X_r X_rᵀ: permuting features inside every head is free
    heads = relation_heads(24, 24)
    perm = torch.cat([h * (24 // heads) + torch.randperm(24 // heads) for h in range(heads)])
    assert relation_loss(x[..., perm], x).item() == pytest.approx(0.0, abs=1e-6)
    y = torch.randn(2, 7, 24)
    assert relation_loss(y, x).item() > 0.01
    # widths may differ (pruned heads): both sides get the same relation heads
    assert relation_heads(384, 768) == 12 and relation_heads(320, 768) == 8
    narrow = torch.randn(2, 7, 16, requires_grad=True)
    loss = relation_loss(narrow, x)
    loss.backward()
    assert loss.item() > 0 and narrow.grad.abs().sum() > 0
    rows = self_relation(x, 4).exp().sum(dim=-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_relation_loss_refuses_other_sequence_lengths():
    with pytest.raises(ValueError, match="sequence"):
        relation_loss(torch.randn(2, 5, 8), torch.randn(2, 6, 8))


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 99, (1, 16))
    return model, ids


def _relation_gap(student, teacher, pairs, x) -> float:
    from graphopt.passes.distill.features import tapped_module

    s = tapped_module(student.module, [p.student for p in pairs])
    t = tapped_module(teacher.module, [p.teacher for p in pairs])
    with torch.no_grad():
        _, fs = s(x)
        _, ft = t(x)
    return float(sum(relation_loss(a, b) for a, b in zip(fs, ft)) / len(pairs))


def test_attention_features_pick_the_last_layers_projections_and_train(bert):
    model, ids = bert
    teacher = graphopt.trace(model, ids)
    student = graphopt.trace(model, ids)
    graphopt.Pipeline.parse("prune(ratio=0.5,units=heads)").run(student)
    pairs = attention_pairs(student, teacher)
    paths = [graphopt.graph.node_meta(teacher.node(p.teacher)).module_path for p in pairs]
    assert paths == [f"encoder.layer.1.attention.self.{n}" for n in ("query", "key", "value")]
    s_q = graphopt.graph.node_meta(student.node(pairs[0].student)).shape
    t_q = graphopt.graph.node_meta(teacher.node(pairs[0].teacher)).shape
    assert s_q[-1] == t_q[-1] // 2  # half the heads: the widths differ, no adapter needed

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 99, (8, 16), generator=gen),) for _ in range(4)]
    probe = data[0][0]
    before = _relation_gap(student, teacher, pairs, probe)
    result = graphopt.Pipeline.parse(
        "distill(epochs=4,lr=0.001,features=attention,feature-loss=relation,feature-weight=10)"
    ).run(student, data=data, teacher=teacher)
    report = result.reports[0].details
    assert [f["student"] for f in report["features"]] == [p.student for p in pairs]
    after = _relation_gap(student, teacher, pairs, probe)
    assert after < 0.8 * before, (before, after)


def test_attention_features_need_an_attention_call():
    g = graphopt.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.randn(2, 4))
    with pytest.raises(OptionError, match="scaled_dot_product_attention"):
        attention_pairs(g, g)


def test_auto_pairs_distil_hidden_states_through_adapters_after_hidden_pruning():
    """After ``prune(units=hidden)`` the student's hidden states are narrower: ``features=auto``
    pairs the LayerNorm outputs on the residual stream (TinyBERT's hidden-state loss) with a
    learned projection to the teacher's width, and training lowers the loss."""
    from graphopt.passes.distill.features import auto_pairs

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(cfg).eval()
    g = graphopt.trace(model, {"input_ids": torch.randint(0, 99, (4, 16))})
    teacher = g.copy()
    data = [(torch.randint(0, 99, (8, 16)),) for _ in range(4)]
    r = graphopt.Pipeline.parse("prune(ratio=0.5,units=hidden)").run(g)
    student = r.graph
    pairs = auto_pairs(student, teacher)
    assert pairs and all("layer_norm" in p.student for p in pairs)
    assert [p.student for p in pairs] == [p.teacher for p in pairs]
    g = graphopt.trace(model, {"input_ids": torch.randint(0, 99, (4, 16))})
    text = "prune(ratio=0.5,units=hidden),distill(epochs=3,features=auto)"
    r = graphopt.Pipeline.parse(text).run(g, data=data)  # the teacher: the graph before prune
    rep = r.reports[1].details
    assert [f["student"] for f in rep["features"]] == [p.student for p in pairs]
    assert all(f["adapter"] for f in rep["features"])  # 16 student channels -> 32
    assert rep["loss_last"] < rep["loss_first"]
    assert not any("adapter" in k for k in r.graph.module.state_dict())
