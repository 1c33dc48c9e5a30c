"""The bundled default model ``digits:vgg``: a small VGG-style CNN trained on scikit-learn's
handwritten digits (1,797 grayscale 8x8 images, 10 classes, shipped inside scikit-learn, so
nothing is downloaded).

* :func:`load_digits_data` gives a fixed, stratified 80/20 train/test split with pixels scaled
  to ``[0, 1]``; :meth:`DigitsData.batches` gives ``(inputs, labels)`` batches.
* :func:`pretrained_vgg` trains the model deterministically on first use (a few seconds on a
  CPU) and caches the weights under the user's cache directory; later calls load the cache.
* :func:`evaluate` computes top-1 accuracy of a module or any ``inputs -> logits`` callable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.atomic import atomic_path

log = logging.getLogger(__name__)

INPUT_SHAPE = (1, 1, 8, 8)
NUM_CLASSES = 10
CACHE_FORMAT = "graphopt.zoo.digits.vgg"
CACHE_VERSION = 1

Progress = Callable[..., Iterable]


# -- data --------------------------------------------------------------------------------------
@dataclass
class DigitsData:
    """The digits split: ``x_*`` are float32 ``[N, 1, 8, 8]`` in ``[0, 1]``, ``y_*`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            return self.x_test, self.y_test
        raise ValueError(f"unknown split {name!r}; use 'train' or 'test'")

    def batches(
        self, split: str, batch_size: int = 64, labels: bool = True
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | list[torch.Tensor]:
        """The split cut into consecutive batches (a list, so it can be iterated again):
        ``(inputs, labels)`` tuples, or bare input tensors with ``labels=False``."""
        x, y = self.split(split)
        xs, ys = x.split(batch_size), y.split(batch_size)
        return list(zip(xs, ys)) if labels else list(xs)


def load_digits_data(seed: int = 0, test_fraction: float = 0.2) -> DigitsData:
    """scikit-learn's digits, split 80/20 stratified by class with ``seed``; pixels / 16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data.astype(np.float32) / 16.0).reshape(-1, *INPUT_SHAPE[1:])
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsData(
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
    )


# -- model -------------------------------------------------------------------------------------
def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DigitsVGG(nn.Module):
    """VGG-style CNN for 1x8x8 inputs: two blocks of two conv-BN-ReLU layers, each followed by
    a 2x2 max-pool (8x8 -> 4x4 -> 2x2), then flatten, Linear-ReLU, Dropout, Linear."""

    def __init__(self, widths: tuple[int, int] = (16, 32), hidden: int = 64, dropout: float = 0.2):
        super().__init__()
        w1, w2 = widths
        self.features = nn.Sequential(
            *_conv_bn_relu(1, w1),
            *_conv_bn_relu(w1, w1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w1, w2),
            *_conv_bn_relu(w2, w2),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(w2 * 2 * 2, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# -- training ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the cached model; any change invalidates the cache."""

    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 5e-4
    shift: int = 1  # random translation augmentation, in pixels


def _augment(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels (zero fill)."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2 * shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_vgg(
    data: DigitsData, config: TrainConfig = TrainConfig(), progress: Progress | None = None
) -> DigitsVGG:
    """Train a :class:`DigitsVGG` from a fixed seed (AdamW, one-cycle schedule, shift
    augmentation) and return it in eval mode.

    Runs on one thread: the model is tiny, so more threads only add synchronisation (and
    results then do not depend on the machine's core count)."""
    wrap = progress or (lambda it, desc="", total=None: it)
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = DigitsVGG()
        gen = torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps = config.epochs * -(-len(data.y_train) // config.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
        model.train()
        epochs = range(config.epochs)
        for epoch in wrap(epochs, desc="training digits:vgg", total=config.epochs):
            perm = torch.randperm(len(data.y_train), generator=gen)
            total = 0.0
            for idx in perm.split(config.batch_size):
                x = _augment(data.x_train[idx], config.shift, gen)
                loss = F.cross_entropy(model(x), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            log.debug("digits:vgg epoch %d: loss %.4f", epoch + 1, total / len(data.y_train))
    return model.eval()


def evaluate(model: nn.Module | Callable[[torch.Tensor], Any], batches: Iterable) -> float:
    """Top-1 accuracy of ``model`` (a module, run in eval mode, or any callable mapping an
    input batch to logits as a tensor or array) over ``(inputs, labels)`` batches."""
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    correct = seen = 0
    try:
        with torch.no_grad():
            for x, y in batches:
                logits = model(x)
                if isinstance(logits, (list, tuple)):
                    logits = logits[0]
                logits = torch.as_tensor(np.asarray(logits))
                correct += int((logits.argmax(dim=1) == y).sum())
                seen += len(y)
    finally:
        if was_training:
            model.train()
    return correct / seen if seen else float("nan")


# -- cache -------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$GRAPHOPT_CACHE``, else ``$XDG_CACHE_HOME/graphopt``, else ``~/.cache/graphopt``."""
    if os.environ.get("GRAPHOPT_CACHE"):
        return Path(os.environ["GRAPHOPT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "graphopt"


def cache_path(directory: str | os.PathLike | None = None) -> Path:
    return Path(directory or cache_dir()) / f"digits-vgg-v{CACHE_VERSION}.pt"


def _load_cached(path: Path, config: TrainConfig) -> DigitsVGG | None:
    """The cached model, or ``None`` (with a warning) when the file is missing or invalid."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
            raise ValueError("not a graphopt digits:vgg cache file")
        if blob.get("version") != CACHE_VERSION or blob.get("config") != dataclasses.asdict(config):
            raise ValueError("written by a different version or training configuration")
        model = DigitsVGG()
        model.load_state_dict(blob["state_dict"], strict=True)
        if not all(
            torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
        ):
            raise ValueError("non-finite weights")
    except Exception as e:
        log.warning("ignoring the digits:vgg cache %s (%s); retraining", path, e)
        return None
    log.info("loaded digits:vgg from the cache %s", path)
    return model.eval()


def _save_cache(path: Path, model: DigitsVGG, config: TrainConfig, info: dict[str, float]) -> None:
    blob = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "config": dataclasses.asdict(config),
        "state_dict": model.state_dict(),
        **info,
    }
    try:
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)
    except OSError as e:
        log.warning("could not cache digits:vgg at %s: %s", path, e)
        return
    log.info("cached digits:vgg at %s", path)


def pretrained_vgg(
    cache_dir: str | os.PathLike | None = None, progress: Progress | None = None
) -> DigitsVGG:
    """The trained ``digits:vgg`` in eval mode: loaded from the cache, or trained (and cached)
    when the cache is missing, stale or corrupt. ``progress(iterable, desc, total)`` wraps the
    training epochs."""
    config = TrainConfig()
    path = cache_path(cache_dir)
    model = _load_cached(path, config)
    if model is not None:
        return model
    data = load_digits_data(config.seed)
    log.info("training digits:vgg (first use; cached afterwards at %s)", path)
    t0 = time.perf_counter()
    model = train_vgg(data, config, progress)
    seconds = time.perf_counter() - t0
    accuracy = evaluate(model, data.batches("test", 256))
    log.info("trained digits:vgg in %.1fs: test top-1 %.4f", seconds, accuracy)
    _save_cache(path, model, config, {"test_accuracy": accuracy, "train_seconds": seconds})
    return model
