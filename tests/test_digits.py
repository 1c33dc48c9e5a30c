"""The bundled digits data and the cached, trained ``digits:vgg``."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch

from graphopt.zoo import digits


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One cache directory for the whole session (test_cli.py uses the same path), so the
    model is trained once."""
    path = tmp_path_factory.getbasetemp() / "graphopt-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAPHOPT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def trained(digits_cache):
    return digits.pretrained_vgg()


def test_split_is_deterministic_and_stratified():
    a, b = digits.load_digits_data(), digits.load_digits_data()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) <= 1.0
    train, test = Counter(a.y_train.tolist()), Counter(a.y_test.tolist())
    assert sorted(test) == list(range(10))
    for cls in range(10):  # each class is split 80/20 to within one sample
        assert abs(test[cls] - 0.2 * (train[cls] + test[cls])) <= 1
    other = digits.load_digits_data(seed=1)
    assert not torch.equal(other.y_test, a.y_test)


def test_batches_are_reiterable_and_cover_the_split():
    data = digits.load_digits_data()
    batches = data.batches("train", batch_size=64)
    assert len(batches) == -(-1437 // 64)
    assert list(batches) == list(batches)
    assert torch.equal(torch.cat([x for x, _ in batches]), data.x_train)
    assert torch.equal(torch.cat([y for _, y in batches]), data.y_train)
    bare = data.batches("test", batch_size=100, labels=False)
    assert [len(x) for x in bare] == [100, 100, 100, 60]
    with pytest.raises(ValueError, match="unknown split"):
        data.batches("valid")


def test_trained_model_is_accurate_and_small(trained):
    data = digits.load_digits_data()
    assert not trained.training
    assert digits.evaluate(trained, data.batches("test")) >= 0.95
    params = sum(p.numel() for p in trained.parameters())
    assert 20_000 <= params <= 100_000


def test_evaluate_takes_callables_returning_arrays(trained):
    batches = digits.load_digits_data().batches("test")
    as_numpy = digits.evaluate(lambda x: trained(x).numpy(), batches)
    assert as_numpy == digits.evaluate(trained, batches)


def test_cache_is_reused_without_training(trained, digits_cache, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise AssertionError("trained again although the cache is valid")

    monkeypatch.setattr(digits, "train_vgg", fail)
    assert digits.cache_path().parent == digits_cache
    with caplog.at_level(logging.INFO, logger="graphopt.zoo.digits"):
        again = digits.pretrained_vgg()
    assert "loaded digits:vgg from the cache" in caplog.text
    for (k, v), (k2, v2) in zip(trained.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "stale"])
def test_a_bad_cache_is_retrained_not_fatal(tmp_path, monkeypatch, caplog, corruption):
    calls = []

    def fake_train(data, config=None, progress=None):
        calls.append(config)
        torch.manual_seed(0)
        return digits.DigitsVGG().eval()

    monkeypatch.setattr(digits, "train_vgg", fake_train)
    path = digits.cache_path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if corruption == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif corruption == "truncated":
        digits.pretrained_vgg(cache_dir=tmp_path)
        path.write_bytes(path.read_bytes()[:200])
        calls.clear()
    else:
        torch.save({"format": digits.CACHE_FORMAT, "version": 0, "state_dict": {}}, path)
    with caplog.at_level(logging.WARNING, logger="graphopt.zoo.digits"):
        model = digits.pretrained_vgg(cache_dir=tmp_path)
    assert len(calls) == 1 and isinstance(model, digits.DigitsVGG)
    assert "ignoring the digits:vgg cache" in caplog.text
    digits.pretrained_vgg(cache_dir=tmp_path)  # the rewritten cache is valid
    assert len(calls) == 1


def test_training_is_deterministic():
    data = digits.load_digits_data()
    config = digits.TrainConfig(epochs=1)
    threads = torch.get_num_threads()
    a, b = digits.train_vgg(data, config), digits.train_vgg(data, config)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert torch.get_num_threads() == threads  # training runs on one thread, then restores


def test_progress_callback_wraps_the_epochs(tmp_path):
    seen = []

    def progress(iterable, desc="", total=None):
        seen.append((desc, total))
        return iterable

    digits.train_vgg(digits.load_digits_data(), digits.TrainConfig(epochs=1), progress)
    assert seen == [("training digits:vgg", 1)]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "g"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert digits.cache_dir() == tmp_path / "g"
    monkeypatch.delenv("GRAPHOPT_CACHE")
    assert digits.cache_dir() == tmp_path / "xdg" / "graphopt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert digits.cache_dir() == tmp_path / "home" / ".cache" / "graphopt"


def test_augmentation_shifts_by_at_most_one_pixel():
    x = torch.zeros(50, 1, 8, 8)
    x[:, :, 3, 4] = 1.0
    out = digits._augment(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    rows, cols = np.nonzero(out[:, 0].sum(0).numpy())
    assert set(rows) <= {2, 3, 4} and set(cols) <= {3, 4, 5}
    assert torch.all(out.sum(dim=(1, 2, 3)) == 1)
