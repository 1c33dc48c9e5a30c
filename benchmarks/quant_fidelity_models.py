"""The models of the int8 fidelity suite (benchmarks/quant_fidelity.py) and their data, all
made here: scikit-learn's digits (bundled) and synthetic tones; training takes seconds to a
minute each on a CPU and the weights are cached."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.zoo.digits import DigitsVGG, load_digits_data

TONES, TONE_LEN = 8, 256


# -- data -----------------------------------------------------------------------------------------
@dataclass
class Task:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    multilabel: bool


def digits_task(attributes: bool = False) -> Task:
    """Digits; with ``attributes`` 14 binary labels: the digit (one-hot), even, >= 5, prime,
    has a closed loop."""
    d = load_digits_data()

    def labels(y):
        if not attributes:
            return y
        extra = [y % 2 == 0, y >= 5, torch.isin(y, torch.tensor([2, 3, 5, 7]))]
        extra.append(torch.isin(y, torch.tensor([0, 6, 8, 9])))
        return torch.cat([F.one_hot(y, 10).bool(), torch.stack(extra, 1)], 1).float()

    return Task(d.x_train, labels(d.y_train), d.x_test, labels(d.y_test), attributes)


def tones(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clips of ``TONE_LEN`` samples: each of ``TONES`` log-spaced tones present with
    probability 0.35 (random amplitude, phase, +-2% detune), white noise of std 0.5."""
    g = torch.Generator().manual_seed(seed)
    freqs = torch.logspace(math.log10(0.02), math.log10(0.35), TONES)
    y = (torch.rand(n, TONES, generator=g) < 0.35).float()
    amp = y * (0.3 + 0.7 * torch.rand(n, TONES, generator=g))
    f = freqs * (1 + 0.02 * (2 * torch.rand(n, TONES, generator=g) - 1))
    ph = 2 * math.pi * torch.rand(n, TONES, 1, generator=g)
    t = torch.arange(TONE_LEN).float()
    x = (amp[..., None] * torch.sin(2 * math.pi * f[..., None] * t + ph)).sum(1)
    x = x + 0.5 * torch.randn(n, TONE_LEN, generator=g)
    return x[:, None, :], y


def tones_task() -> Task:
    return Task(*tones(4096, 0), *tones(512, 1), multilabel=True)


# -- models ---------------------------------------------------------------------------------------
def _cbr(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    pad = k // 2
    return [
        nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    ]


class Residual(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(*_cbr(cin, cout, stride=stride), *_cbr(cout, cout)[:2])
        self.proj = (
            nn.Sequential(*_cbr(cin, cout, 1, stride)[:2]) if stride > 1 or cin != cout else None
        )

    def forward(self, x):
        return torch.relu(self.body(x) + (x if self.proj is None else self.proj(x)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*_cbr(1, 16))
        self.blocks = nn.Sequential(Residual(16, 16, 1), Residual(16, 32, 2), Residual(32, 32, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class Depthwise(nn.Module):
    """MobileNet-style: depthwise 3x3 + pointwise 1x1, each conv-BN-ReLU6."""

    def __init__(self):
        super().__init__()
        layers = _cbr(1, 16, act=nn.ReLU6)
        for cin, cout, s in ((16, 32, 1), (32, 64, 2), (64, 64, 1)):
            layers += _cbr(cin, cin, 3, s, groups=cin, act=nn.ReLU6) + _cbr(
                cin, cout, 1, act=nn.ReLU6
            )
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


class BNAfterReLU(nn.Module):
    """conv -> ReLU -> BatchNorm: the BN cannot fold backwards into the conv."""

    def __init__(self, out: int = 10, sigmoid: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(((1, 16), (16, 32), (32, 32), (32, 64))):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout)]
            if i % 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4, 64), nn.ReLU(), nn.Linear(64, out))
        self.sigmoid = sigmoid

    def forward(self, x):
        y = self.fc(self.features(x))
        return torch.sigmoid(y) if self.sigmoid else y


class PadNet(nn.Module):
    """An explicit zero ``F.pad`` before every (unpadded) conv."""

    def __init__(self):
        super().__init__()
        chans = ((1, 16), (16, 32), (32, 32), (32, 64))
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, bias=False) for a, b in chans)
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for _, b in chans)
        self.fc = nn.Linear(64 * 4, 10)

    def forward(self, x):
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = torch.relu(bn(conv(F.pad(x, (1, 1, 1, 1)))))
            if i % 2:
                x = F.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


class MultiLabel(BNAfterReLU):
    """Conv-BN-ReLU CNN with a sigmoid head over 14 digit attributes."""

    def __init__(self):
        super().__init__(out=14, sigmoid=True)
        for i, m in enumerate(self.features):  # plain conv-BN-ReLU order
            if isinstance(m, nn.ReLU):
                self.features[i - 1], self.features[i] = self.features[i], self.features[i - 1]


class Transformer(nn.Module):
    """The 8 image rows as tokens: Linear embedding, 2 encoder layers, mean, Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 32)
        self.pos = nn.Parameter(torch.zeros(1, 8, 32))
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.enc(self.emb(x.flatten(1, 2)) + self.pos).mean(1))


class AudioNet(nn.Module):
    """1-D: per block zero ``F.pad`` -> Conv1d -> ReLU -> BatchNorm -> MaxPool; global average
    pool; Linear; sigmoid (multi-label)."""

    def __init__(self, widths=(16, 32, 32, 64), k: int = 5):
        super().__init__()
        self.k, cin = k, 1
        self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
        for w in widths:
            self.convs.append(nn.Conv1d(cin, w, k))
            self.bns.append(nn.BatchNorm1d(w))
            cin = w
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(cin, TONES)

    def forward(self, x):
        p = self.k // 2
        for conv, bn in zip(self.convs, self.bns):
            x = F.max_pool1d(bn(torch.relu(conv(F.pad(x, (p, p))))), 2)
        return torch.sigmoid(self.fc(torch.flatten(self.pool(x), 1)))


# name -> (model factory, task factory, epochs)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Task], int]] = {
    "vgg": (DigitsVGG, digits_task, 20),
    "resnet": (ResNet, digits_task, 20),
    "depthwise": (Depthwise, digits_task, 30),
    "bn-after-relu": (BNAfterReLU, digits_task, 20),
    "zero-pad": (PadNet, digits_task, 20),
    "multilabel": (MultiLabel, lambda: digits_task(attributes=True), 20),
    "transformer": (Transformer, digits_task, 40),
    "audio": (AudioNet, tones_task, 8),
    "audio-wide": (lambda: AudioNet((32, 64, 64, 128)), tones_task, 8),
}


@dataclass
class Case:
    name: str
    model: nn.Module
    task: Task
    calib: list[torch.Tensor]
    accuracy: float
    train_s: float = 0.0

    @property
    def example(self) -> tuple[torch.Tensor]:
        return (self.task.x_test[:1],)


def accuracy(out: torch.Tensor, task: Task) -> float:
    """Top-1, or for multi-label outputs (probabilities) exact-match at 0.5."""
    if task.multilabel:
        return float(((out > 0.5).float() == task.y_test).all(1).float().mean())
    return float((out.argmax(1) == task.y_test).float().mean())


def train(model: nn.Module, task: Task, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * -(-len(task.x_train) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(task.x_train), generator=g).split(64):
            out = model(task.x_train[idx])
            y = task.y_train[idx]
            loss = F.binary_cross_entropy(out, y) if task.multilabel else F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def make_case(name: str, cache: Path | None, calib_batches: int = 8, epochs: int | None = None):
    """The trained model ``name`` (from ``cache`` when there), its task and calibration."""
    factory, task_factory, default_epochs = MODELS[name]
    epochs = default_epochs if epochs is None else epochs
    task = task_factory()
    torch.manual_seed(0)
    model = factory()
    path = cache / f"{name}-e{epochs}-v1.pt" if cache else None
    t0 = time.perf_counter()
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
    else:
        train(model, task, epochs)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
    secs = time.perf_counter() - t0
    with torch.no_grad():
        acc = accuracy(model(task.x_test), task)
    calib = list(task.x_train[: 32 * calib_batches].split(32))
    return Case(name, model, task, calib, acc, secs)
