"""``--data`` beyond the bundled set: .pt/.npy/.npz files, image folders and factories; named
inputs (``--input NAME=DIMS[:DTYPE]``) for models with several or integer inputs."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from graphopt.app import cli
from graphopt.errors import DataError
from graphopt.zoo.datasets import load_data
from graphopt.zoo.models import load_model

USER = """
import torch
import torch.nn as nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa, self.fb, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, a, b):
        return self.head(torch.relu(self.fa(a) + self.fb(b)))


def two():
    torch.manual_seed(0)
    return Two()


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, ids, mask):
        return self.head((self.emb(ids) * mask.unsqueeze(-1)).mean(1))


def tokens():
    torch.manual_seed(0)
    return Tokens()


def images():
    return (torch.rand(4, 3, 8, 8) for _ in range(3))  # a generator, no labels


def token_batches():
    g = torch.Generator().manual_seed(0)
    return [
        {"ids": torch.randint(0, 10, (4, 6), generator=g), "mask": torch.ones(4, 6),
         "labels": torch.randint(0, 3, (4,), generator=g)}
        for _ in range(5)
    ]


def boom():
    raise RuntimeError("no data today")
"""


class _Payload:
    """Unpickling this would create ``marker``: proof of code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def user(tmp_path):
    path = tmp_path / "user.py"
    path.write_text(textwrap.dedent(USER))
    return path


def invoke(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _labelled(n=40, shape=(3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)


# -- formats -----------------------------------------------------------------------------------
def test_pt_tensor_is_cut_into_unlabelled_batches(tmp_path):
    x = torch.randn(10, 3)
    torch.save(x, tmp_path / "x.pt")
    data = load_data(tmp_path / "x.pt", batch_size=4)
    assert [b.shape[0] for b in data.train] == [4, 4, 2]
    assert torch.equal(torch.cat(data.train), x)
    assert not data.has_test and data.sample_shapes == ((3,),)
    assert data.name == str(tmp_path / "x.pt")


def test_pt_pair_holds_out_the_last_fifth_as_test(tmp_path):
    x, y = _labelled(10, (5,))
    torch.save((x, y), tmp_path / "xy.pth")
    data = load_data(tmp_path / "xy.pth", batch_size=4)
    train_y = torch.cat([b[1] for b in data.train])
    (test_x, test_y), *rest = data.test
    assert not rest and torch.equal(train_y, y[:8]) and torch.equal(test_y, y[8:])
    assert torch.equal(test_x, x[8:])


def test_pt_dict_with_several_inputs_and_a_list_of_batches(tmp_path):
    a, b, y = torch.randn(6, 4), torch.randn(6, 2), torch.randint(0, 3, (6,))
    torch.save({"inputs": (a, b), "labels": y}, tmp_path / "d.pt")
    data = load_data(tmp_path / "d.pt", batch_size=8)
    ((ta, tb), ty), *_ = data.train
    assert ta.shape == (5, 4) and tb.shape == (5, 2) and ty.shape == (5,)
    assert data.sample_shapes == ((4,), (2,))
    batches = [(torch.randn(2, 4), torch.randint(0, 3, (2,))) for _ in range(5)]
    torch.save(batches, tmp_path / "list.pt")
    data = load_data(tmp_path / "list.pt")
    assert len(data.train) == 4 and len(data.test) == 1
    assert torch.equal(data.test[0][1], batches[-1][1])


def test_npy_and_npz_forms(tmp_path):
    np.save(tmp_path / "x.npy", np.random.rand(7, 2, 3))  # float64: read as float32
    data = load_data(tmp_path / "x.npy", batch_size=5)
    assert [b.shape for b in data.train] == [(5, 2, 3), (2, 2, 3)]
    assert data.train[0].dtype == torch.float32 and not data.has_test
    np.savez(tmp_path / "xy.npz", x=np.ones((5, 3), "f4"), y=np.arange(5))
    data = load_data(tmp_path / "xy.npz")
    assert [len(b[1]) for b in data.train] == [4] and torch.equal(
        data.test[0][1], torch.tensor([4])
    )
    np.savez(tmp_path / "named.npz", b=np.zeros((3, 2), "f4"), a=np.ones((3, 4), "f4"))
    data = load_data(tmp_path / "named.npz", input_names=["a", "b"])
    (a, b), *_ = data.train
    assert a.shape == (3, 4) and b.shape == (3, 2)  # in the model's order, not the file's


def test_factories_from_a_file_and_a_module(user, tmp_path, monkeypatch):
    data = load_data(f"{user}:images")
    assert len(data.train) == 3 and data.train[0].shape == (4, 3, 8, 8) and not data.has_test
    data = load_data(f"{user}:token_batches", input_names=["ids", "mask"])
    ((ids, mask), y), *_ = data.train
    assert ids.dtype == torch.int64 and mask.shape == (4, 6) and y.shape == (4,)
    assert len(data.train) == 4 and len(data.test) == 1
    (tmp_path / "mydata.py").write_text(
        "import torch\n\ndef load():\n    return torch.ones(3, 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_data("mydata:load").train[0].shape == (3, 2)


@pytest.mark.parametrize(
    ("make", "spec", "fragments"),
    [
        (None, "{tmp}/missing.pt", ["missing.pt", "does not exist"]),
        (None, "mnist", ["unknown data set 'mnist'", "digits", ".npz"]),
        (lambda p: (p / "x.csv").write_text("1,2"), "{tmp}/x.csv", ["'.csv'", ".pt/.npy/.npz"]),
        (lambda p: torch.save(torch.empty(0, 3), p / "e.pt"), "{tmp}/e.pt", ["no samples"]),
        (lambda p: torch.save([], p / "e.pt"), "{tmp}/e.pt", ["no batches"]),
        (
            lambda p: torch.save(torch.tensor([[1.0], [float("nan")]]), p / "n.pt"),
            "{tmp}/n.pt",
            ["NaN or Inf", "sample 1"],
        ),
        (
            lambda p: torch.save(
                {"inputs": torch.ones(4, 2), "labels": torch.arange(3)}, p / "l.pt"
            ),
            "{tmp}/l.pt",
            ["3 labels for 4 samples"],
        ),
        (
            lambda p: np.savez(p / "o.npz", x=np.array([{}, 1], dtype=object)),
            "{tmp}/o.npz",
            ["Python objects", "np.savez"],
        ),
        (
            lambda p: np.savez(p / "k.npz", inputs=np.ones((2, 2)), extra=np.ones(2)),
            "{tmp}/k.npz",
            ["unexpected ['extra']"],
        ),
        (None, "{user}:imagez", ["no factory 'imagez'", "did you mean 'images'"]),
        (None, "{user}:boom", ["RuntimeError", "no data today"]),
        (None, "{tmp}/nope.py:make", ["nope.py", "does not exist"]),
    ],
)
def test_bad_data_is_one_data_error(user, tmp_path, make, spec, fragments):
    if make:
        make(tmp_path)
    with pytest.raises(DataError) as info:
        load_data(spec.format(tmp=tmp_path, user=user))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_pickled_object_in_a_data_file_is_refused_not_run(tmp_path, capsys, user):
    marker = tmp_path / "executed"
    torch.save({"inputs": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="objects other than tensors.*torch.save"):
        load_data(tmp_path / "evil.pt")
    code, _, err = invoke(
        capsys, "run", f"{user}:make", "--input-shape", "1,3,8,8", "--data", tmp_path / "evil.pt",
        "--pipeline", "qdq", "--out", tmp_path / "o",
    )  # fmt: skip
    assert code == 2 and "objects other than tensors" in err
    assert not marker.exists()
    live = tmp_path / "live"  # the payload does run under full unpickling: the test means it
    torch.save({"inputs": _Payload(live)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)["inputs"].close()
    assert live.exists()


# -- image folders -----------------------------------------------------------------------------
def test_an_image_folder_fits_the_model_input(tmp_path):
    pytest.importorskip("torchvision")
    image = pytest.importorskip("PIL.Image")
    for k, cls in enumerate(("cat", "dog")):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(5):
            pixels = np.full((10, 12, 3), 30 * i + 100 * k, dtype=np.uint8)
            image.fromarray(pixels).save(tmp_path / "img" / cls / f"{i}.png")
    data = load_data(tmp_path / "img", input_shape=(1, 3, 8, 8), batch_size=4)
    xs, ys = zip(*((x, y) for x, y in data.train))
    assert all(x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32 for x in xs)
    assert sum(len(y) for y in ys) == 8 and sum(len(y) for _, y in data.test) == 2
    assert 0.0 <= min(float(x.min()) for x in xs) and max(float(x.max()) for x in xs) <= 1.0
    gray = load_data(tmp_path / "img", input_shape=(1, 1, 6, 6), transform="imagenet")
    x, y = next(iter(gray.train))
    assert x.shape[1:] == (1, 6, 6) and float(x.min()) < 0  # normalised
    with pytest.raises(DataError, match="not images"):
        load_data(tmp_path / "img", input_shape=(1, 16))
    with pytest.raises(DataError, match="one sub-folder of images per class"):
        load_data(tmp_path / "img" / "cat", input_shape=(1, 3, 8, 8))
    with pytest.raises(DataError, match="--transform applies to image folders"):
        load_data("digits", transform="imagenet")


# -- the command line --------------------------------------------------------------------------
def test_run_calibrates_on_a_pt_file_and_records_it(user, tmp_path, capsys):
    torch.save(_labelled(), tmp_path / "x.pt")
    code, out, err = invoke(
        capsys, "run", f"{user}:make", "--input-shape", "1,3,8,8", "--data", tmp_path / "x.pt",
        "--pipeline", "qdq", "--out", tmp_path / "o", "--runs", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "top-1 (ORT)" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["data"] == str(tmp_path / "x.pt")
    assert 0.0 <= report["results"]["optimized"]["top1_ort"] <= 1.0


def test_run_prunes_with_taylor_importance_on_an_npz(user, tmp_path, capsys):
    x, y = _labelled(seed=1)
    np.savez(tmp_path / "x.npz", inputs=x.numpy(), labels=y.numpy())
    code, out, err = invoke(
        capsys, "run", f"{user}:make", "--input-shape", "1,3,8,8", "--data", tmp_path / "x.npz",
        "--pipeline", "prune(ratio=0.5,importance=taylor)", "--out", tmp_path / "o",
        "--backend", "none",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["data"] == str(tmp_path / "x.npz")
    assert report["cost"]["optimized"]["macs"] < report["cost"]["original"]["macs"]
    assert "top1" in report["results"]["optimized"]


def test_unlabelled_data_skips_accuracy(user, tmp_path, capsys):
    code, out, err = invoke(
        capsys, "run", f"{user}:make", "--input-shape", "1,3,8,8", "--data", f"{user}:images",
        "--pipeline", "qdq", "--out", tmp_path / "o", "--backend", "none",
    )  # fmt: skip
    assert code == 0, err
    assert "top-1" not in out.split("model ", 1)[1]  # no accuracy columns in the table
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "top1" not in report["results"]["optimized"]


def test_named_inputs_trace_a_model_with_two_inputs(user, tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    np.savez(
        tmp_path / "two.npz",
        b=torch.randn(20, 4, generator=g).numpy(),
        a=torch.randn(20, 4, generator=g).numpy(),
        y=np.arange(20) % 3,
    )
    code, out, err = invoke(
        capsys, "run", f"{user}:two", "--input", "a=1,4", "--input", "b=1,4",
        "--data", tmp_path / "two.npz", "--pipeline", "qdq", "--out", tmp_path / "o",
        "--runs", "2",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["results"]["optimized"]["parity"]["cosine"] > 0.9
    assert "top1_ort" in report["results"]["optimized"]
    code, out, err = invoke(
        capsys, "inspect", f"{user}:two", "--input", "a=1,4", "--input", "c=1,4"
    )
    assert code == 2 and "'c' is not a parameter" in err and "a, b" in err


def test_integer_inputs_take_token_ids(user, tmp_path, capsys):
    model, inputs = load_model(f"{user}:tokens", named_inputs=["ids=2,6:int64", "mask=2,6"])
    assert inputs["ids"].dtype == torch.int64 and int(inputs["ids"].max()) < 2
    assert inputs["mask"].dtype == torch.float32
    code, out, err = invoke(
        capsys, "run", f"{user}:tokens", "--input", "ids=1,6:int64", "--input", "mask=1,6",
        "--data", f"{user}:token_batches", "--pipeline", "qdq", "--out", tmp_path / "o",
        "--backend", "none",
    )  # fmt: skip
    assert code == 0, err
    torch.save({"inputs": (torch.randn(4, 6), torch.ones(4, 6))}, tmp_path / "floats.pt")
    code, out, err = invoke(
        capsys, "run", f"{user}:tokens", "--input", "ids=1,6:int64", "--input", "mask=1,6",
        "--data", tmp_path / "floats.pt", "--pipeline", "qdq", "--out", tmp_path / "o2",
    )  # fmt: skip
    assert code == 2 and "input 'ids' as float" in err and "integer" in err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--input-shape", "1,3,8,8", "--input-shape", "1,3,9,9"],
            "give --input-shape once; for several inputs use --input NAME=DIMS",
        ),
        (["--input-shape", "1,3,8,8", "--input", "x=1,3,8,8"], "not both"),
        (["--input", "x=1,3,8,8", "--input-shape", "1,3,8,8"], "not both"),
        (["--input", "x=1,2", "--input", "x=1,3"], "'x' is given twice"),
        (["--input", "x=1,2:int8"], "unknown dtype 'int8'"),
        (["--input", "1,2"], "NAME=DIMS"),
    ],
)
def test_input_flags_are_checked_by_the_parser(user, tmp_path, capsys, args, fragment):
    code, _, err = invoke(
        capsys, "run", f"{user}:make", "--pipeline", "dce", "--out", tmp_path, *args
    )
    assert code == 2
    assert err.startswith("graphopt: error: ") and fragment in err, err


def test_data_that_does_not_fit_names_the_input(user, tmp_path, capsys):
    torch.save(torch.randn(4, 3), tmp_path / "a.pt")
    code, _, err = invoke(
        capsys, "run", f"{user}:two", "--input", "a=1,4", "--input", "b=1,4",
        "--data", tmp_path / "a.pt", "--pipeline", "dce", "--out", tmp_path / "o",
    )  # fmt: skip
    assert code == 2 and "1 input(s) per sample but the model takes 2 (a, b)" in err
    code, _, err = invoke(
        capsys, "inspect", f"{user}:make", "--input-shape", "1,3,8,8", "--transform", "imagenet",
        "--quant-sensitivity", "--data", tmp_path / "a.pt",
    )  # fmt: skip
    assert code == 2 and "--transform applies to image folders" in err
