"""The concrete-value and torch.export front ends on models nobody here wrote: Hugging Face transformers built
from configs (random weights, saved with ``save_pretrained`` and loaded offline through the
``hf:PATH`` spec) and torchvision. The lifted graph must compute what the model computes, at
other batch sizes too, and every pass and the ONNX export must run on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.backends.onnxruntime import check_parity, export
from graphopt.zoo.models import load_model

transformers = pytest.importorskip("transformers")


def _configs():
    t = transformers
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return {
        "bert": t.BertConfig(vocab_size=99, hidden_size=32, max_position_embeddings=64, **small),
        "distilbert": t.DistilBertConfig(
            vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
        ),
        "vit": t.ViTConfig(image_size=16, patch_size=4, hidden_size=32, **small),
        "gpt2": t.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "wav2vec2": t.Wav2Vec2Config(
            hidden_size=32,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            **small,
        ),  # fmt: skip
        # an encoder-decoder: hf:PATH compresses its encoder (log-mel frames in)
        "whisper": t.WhisperConfig(
            vocab_size=99,
            num_mel_bins=16,
            d_model=32,
            encoder_layers=2,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=16,
            max_target_positions=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
    }


@pytest.fixture(scope="module", params=sorted(_configs()))
def hf_model(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = _configs()[request.param]
    path = tmp_path_factory.mktemp(request.param)
    transformers.AutoModel.from_config(cfg).save_pretrained(path)
    model, inputs = load_model(f"hf:{path}")
    return request.param, model, inputs


def _outputs(out):
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    return (
        [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
    )


def _assert_same(got, want):
    g, w = _outputs(got), _outputs(want)
    assert len(g) == len(w)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_hf_models_trace_exactly_and_at_other_batch_sizes(hf_model, frontend):
    name, model, inputs = hf_model
    g = graphopt.trace(model, inputs, frontend=frontend)
    rep = g.trace_report
    if frontend == "auto":  # plain fx fails on every one; the concrete tracer takes them all
        assert rep["frontend"] == "concrete", rep
        assert rep["fallbacks"] and rep["fallbacks"][0].startswith("fx:")  # fx was tried first
    else:
        assert rep["frontend"] == "export", rep
    with torch.no_grad():
        out = model(*inputs)
    assert rep["outputs"] == [k for k, v in out.items() if v is not None]  # ONNX output names
    layers = [n for n in g.nodes if n.op == "call_module"]
    assert any(
        isinstance(g.submodule(n.target), nn.Linear)
        or type(g.submodule(n.target)).__name__ == "Conv1D"
        or isinstance(g.submodule(n.target), nn.Embedding)
        for n in layers
    )
    with torch.no_grad():
        _assert_same(g.module(*inputs), model(*inputs))
        bigger = tuple(torch.cat([t] * 3) for t in inputs)
        _assert_same(g.module(*bigger), model(*bigger))
    # the user's model is untouched: same parameters object count, still its own class
    assert all(
        p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), g.module.parameters())
    )


def test_hf_models_run_every_pass_and_export(hf_model, tmp_path):
    name, model, inputs = hf_model
    g = graphopt.trace(model, inputs)
    exact = graphopt.Pipeline.parse("fold-bn,dce,remove-identity").run(g)
    assert all(r.verified or not r.modified for r in exact.reports)
    data = [tuple(torch.cat([t] * 4) for t in inputs) for _ in range(2)]
    before = sum(p.numel() for p in g.module.parameters())
    lossy = graphopt.Pipeline.parse("prune(ratio=0.5),qdq(activations=dynamic)").run(g, data=data)
    prune_report = lossy.reports[0].details
    assert prune_report["params_after"] < before, prune_report["summary"]
    path = export(lossy.graph, tmp_path / f"{name}.onnx")
    parity = check_parity(lossy.graph, path)
    assert parity["ok"], parity


def test_torchvision_through_export_folds_and_prunes_like_fx():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    gx = graphopt.trace(model, x, frontend="export")
    gf = graphopt.trace(model, x, frontend="fx")
    assert gx.trace_report["frontend"] == "export"

    def layers(g):
        mods = (g.submodule(n.target) for n in g.nodes if n.op == "call_module")
        keep = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
        return sorted(type(m).__name__ for m in mods if isinstance(m, keep))

    assert layers(gx) == layers(gf)  # every conv, bn, linear lifted to its module
    with torch.no_grad():
        torch.testing.assert_close(gx.module(x), model(x))
    for g in (gx, gf):
        r = graphopt.Pipeline.parse("fold-bn,prune(ratio=0.5)").run(g)
        assert "folded 20 of 20" in r.reports[0].summary
    px = sum(p.numel() for p in gx.module.parameters())
    pf = sum(p.numel() for p in gf.module.parameters())
    assert px == pf


class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent at the top level: no front end can capture it
            return self.fc(x)
        return -x


def test_a_model_no_front_end_captures_names_both_failures():
    with pytest.raises(graphopt.TraceError) as info:
        graphopt.trace(DataBranch(), torch.randn(2, 4))
    msg = str(info.value)
    assert "fx:" in msg and "export:" in msg and "leaf_modules" in msg
    assert "x.sum() > 0" in msg  # the source line that failed


def test_unknown_frontend_is_refused():
    with pytest.raises(graphopt.TraceError, match="unknown frontend"):
        graphopt.trace(DataBranch(), torch.randn(2, 4), frontend="onnx")


def test_the_c_backend_compiles_export_traced_transformers(hf_model, tmp_path):
    from graphopt.backends.c import build

    name, model, inputs = hf_model
    if name not in ("distilbert", "vit"):
        pytest.skip("BERT is compiled in test_c_transformer; two more here")
    g = graphopt.trace(model, inputs)
    cm = build(export(g, tmp_path / f"{name}.onnx", dynamic_batch=False))
    got = cm.run(*(t.numpy() for t in g.example_inputs))[0]
    want = g.module(*g.example_inputs)
    want = (want[0] if isinstance(want, (tuple, list)) else next(iter(want.values()))).detach()
    assert abs(got - want.numpy()).max() <= 1e-5 * abs(want).max().item()


def test_the_c_backend_compiles_an_export_traced_cnn(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from graphopt.backends.c import build

    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    g = graphopt.trace(model, x, frontend="export")
    graphopt.Pipeline.parse("fold-bn,prune(ratio=0.3)").run(g)
    cm = build(export(g, tmp_path / "mv2.onnx", dynamic_batch=False))
    got = cm.run(x.numpy())[0]
    want = g.module(x).detach().numpy()
    assert abs(got - want).max() <= 1e-4 * abs(want).max()


def test_the_cli_compresses_a_saved_hugging_face_folder(hf_model, tmp_path, capsys):
    from graphopt.app import cli

    name, model, inputs = hf_model
    if name not in ("bert", "whisper"):
        pytest.skip("one encoder and one encoder-decoder are enough here")
    folder = tmp_path / name
    if name == "whisper":  # the whole encoder-decoder, as a user keeps it
        torch.manual_seed(0)
        transformers.AutoModel.from_config(_configs()["whisper"]).save_pretrained(folder)
    else:
        model.save_pretrained(folder)
    out = tmp_path / "out"
    code = cli.main(
        [
            "run",
            f"hf:{folder}",
            "--pipeline",
            "prune(ratio=0.5),qdq(activations=dynamic)",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "model.onnx").is_file()
    if name == "whisper":
        assert "encoder-decoder" in captured.err and "compressing its encoder" in captured.err
        return
    code = cli.main(
        [
            "run",
            f"hf:{folder}",
            "--pipeline",
            "dce",
            "--frontend",
            "fx",
            "--strict-trace",
            "--out",
            str(tmp_path / "fx"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cannot trace" in err  # fx alone, strictly, cannot take BERT
