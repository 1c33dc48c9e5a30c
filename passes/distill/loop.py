"""Knowledge distillation: train a compressed student against a teacher.

The objective per batch, with student logits ``s``, teacher logits ``t``, labels ``y`` (when
the batches carry them) and feature pairs ``(f_s, f_t)`` through adapters ``a``::

    L = α · KD_T(s, t) + (1 - α) · CE(s, y) + β · mean_pairs ℓ(a(f_s), f_t)

``KD_T`` is Hinton's temperature-``T`` KL divergence (see :mod:`graphopt.passes.distill.losses`); without
labels ``L = KD_T + β·features``. ``α = 0`` is plain fine-tuning with labels through the same
loop. The student is a :class:`~graphopt.graph.Graph` trained in place; features are read by
taps (:mod:`graphopt.passes.distill.features`), adapters are dropped afterwards.

:func:`distill` is the library entry point (it takes an ``on_epoch`` evaluation hook); the
``distill`` pass wraps it. Under ``torchrun`` it trains with DistributedDataParallel, each rank
on its shard of every epoch's permutation; rank 0 alone writes checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from graphopt import distributed
from graphopt.errors import DataError, DistillError, OptionError
from graphopt.graph import Graph
from graphopt.masks import (
    apply_masks,
    magnitude_masks,
    masks_of,
    schedule_of,
    set_masks,
    set_schedule,
)
from graphopt.passes.distill.batches import Batches
from graphopt.passes.distill.checkpoint import CHECKPOINT, EpochStats, resume, save_checkpoint
from graphopt.passes.distill.features import (
    FeaturePair,
    adapter_for,
    attention_pairs,
    auto_pairs,
    parse_pairs,
    tapped_module,
)
from graphopt.passes.distill.losses import NEEDS_ADAPTER, get_loss, kd_loss

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 256 << 20  # teacher outputs cached in memory below this size


@dataclass(frozen=True)
class DistillOptions:
    epochs: int = field(default=10, metadata={"help": "passes over the training batches"})
    lr: float = field(
        default=0.01, metadata={"help": "peak learning rate (small CNNs; ~1e-4 for big ones)"}
    )
    optimizer: Literal["adamw", "sgd"] = field(
        default="adamw", metadata={"help": "adamw, or sgd with Nesterov momentum 0.9"}
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "decoupled weight decay"})
    schedule: Literal["cosine", "constant", "onecycle"] = field(
        default="cosine", metadata={"help": "learning-rate schedule over all steps"}
    )
    temperature: float = field(default=4.0, metadata={"help": "KD softmax temperature T"})
    alpha: float = field(
        default=0.9, metadata={"help": "weight of KD against the task loss (when labelled)"}
    )
    features: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "feature pairs student:teacher (node or module path), auto (by provenance), "
            "or attention (the last layer's q, k, v; with feature-loss=relation: MiniLM)"
        },
    )
    feature_loss: str = field(
        default="mse",
        metadata={"help": "registered feature loss: mse, at, relation (MiniLMv2; for attention)"},
    )
    feature_weight: float = field(default=1.0, metadata={"help": "weight β of the feature loss"})
    mixup: float = field(
        default=0.0,
        metadata={"help": "mix input pairs with λ~Beta(m,m); the teacher labels the mix (0: off)"},
    )
    shift: int = field(
        default=0,
        metadata={"help": "translate image inputs by up to N pixels (zero fill); 0: off"},
    )
    batch_size: int | None = field(
        default=None, metadata={"help": "re-batch in-memory data (default: as given)"}
    )
    holdout: float = field(
        default=0.1, metadata={"help": "fraction held out for early stopping (0: none)"}
    )
    patience: int = field(
        default=0, metadata={"help": "stop after N epochs without held-out improvement (0: off)"}
    )
    teacher: str | None = field(
        default=None,
        metadata={"help": "a model spec (.pt2 program, file.py:make, ...); default: as traced"},
    )
    trust_pickle: bool = field(
        default=False,
        metadata={"help": "let a .pt teacher be unpickled (runs code from the file)"},
    )
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "checkpoint directory (default: OUT/distill)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint"})
    seed: int = field(default=0, metadata={"help": "seed for order, dropout and init"})

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight-decay must be >= 0, got {self.weight_decay}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}"),
            (self.feature_weight >= 0, f"feature-weight must be >= 0, got {self.feature_weight}"),
            (0.0 <= self.holdout < 0.5, f"holdout must be in [0, 0.5), got {self.holdout}"),
            (self.patience >= 0, f"patience must be >= 0, got {self.patience}"),
            (self.mixup >= 0, f"mixup must be >= 0, got {self.mixup}"),
            (self.shift >= 0, f"shift must be >= 0, got {self.shift}"),
            (self.batch_size is None or self.batch_size >= 1, "batch-size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionError(f"distill: {message}")
        get_loss(self.feature_loss)
        for word in ("auto", "attention"):
            if word in self.features and len(self.features) > 1:
                raise OptionError(f"distill: features={word} cannot be combined with other pairs")


# -- modules --------------------------------------------------------------------------------------
def _logits(out: Any, who: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DistillError(f"distill: the {who}'s output is a {type(out).__name__}; expected logits")


class _Student(nn.Module):
    """The tapped student plus one adapter per feature pair: ``(logits, adapted features)``."""

    def __init__(self, tapped: nn.Module, adapters: list[nn.Module | None]):
        super().__init__()
        self.tapped = tapped
        self.adapters = nn.ModuleList([a if a is not None else nn.Identity() for a in adapters])

    def forward(self, *inputs: torch.Tensor):
        out, feats = self.tapped(*inputs)
        return _logits(out, "student"), [a(f) for a, f in zip(self.adapters, feats)]


class _Teacher:
    """The tapped teacher in eval mode, with outputs cached per sample for pooled data."""

    def __init__(self, tapped: nn.Module):
        self.tapped = tapped.eval()  # its outputs are computed under no_grad
        self.cache: list[torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, inputs, idx) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.cache is not None and idx is not None:
            vals = [c[idx] for c in self.cache]
            return vals[0], vals[1:]
        out, feats = self.tapped(*inputs)
        return _logits(out, "teacher"), list(feats)

    @torch.no_grad()
    def fill_cache(self, batches: Batches) -> None:
        if not batches.pooled:
            return
        n = len(batches.inputs[0])
        logits, feats = self(tuple(t[:1] for t in batches.inputs), None)
        per_sample = sum(v[0].numel() * v.element_size() for v in [logits, *feats])
        if per_sample * n > CACHE_LIMIT_BYTES:
            return
        chunks = [
            self(tuple(t[i : i + 256] for t in batches.inputs), None) for i in range(0, n, 256)
        ]
        cols = [torch.cat([c[0] for c in chunks])]
        for k in range(len(feats)):
            cols.append(torch.cat([c[1][k] for c in chunks]))
        self.cache = cols


# -- the loop -------------------------------------------------------------------------------------
def _teacher_graph(spec: str, student: Graph, trust_pickle: bool = False) -> Graph:
    from graphopt.tracing import trace
    from graphopt.zoo.models import load_model

    model, _ = load_model(spec, trust_pickle=trust_pickle)
    return trace(model, student.example_inputs)


def _optimizer(params, opts: DistillOptions) -> torch.optim.Optimizer:
    if opts.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=opts.lr, momentum=0.9, nesterov=True, weight_decay=opts.weight_decay
        )
    return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)


def _scheduler(opt, opts: DistillOptions, total_steps: int):
    total = max(1, total_steps)
    if opts.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts.lr, total_steps=total)
    if opts.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _shift(x: torch.Tensor, s: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image of ``[N, C, H, W]`` by ``(dy, dx)`` uniform in ``[-s, s]²``, zero
    fill; other tensors are returned unchanged."""
    if x.dim() != 4 or not x.is_floating_point():
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (s, s, s, s))
    dy = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for oy in range(2 * s + 1):
        for ox in range(2 * s + 1):
            sel = ((dy == oy) & (dx == ox)).nonzero().flatten()
            if len(sel):
                out[sel] = padded[sel, :, oy : oy + h, ox : ox + w]
    return out


def _raise_sparsity(gm: nn.Module, schedule, epoch: int) -> None:
    """Masks for the schedule's sparsity at the end of ``epoch``, by current magnitude,
    never reviving a weight an earlier mask removed."""
    params = dict(gm.named_parameters())
    masks = masks_of(gm)
    weights = {name: params[name] for name in masks}
    new = magnitude_masks(
        weights, sparsity=schedule.at(epoch), scope=schedule.scope, block=schedule.block
    )
    set_masks(gm, {name: new[name] & masks[name] for name in masks})
    apply_masks(gm)


def _mix(x: tuple[torch.Tensor, ...], m: float, gen: torch.Generator):
    """Mixup (Zhang et al. 2018): ``x' = λ·x + (1-λ)·x[π]``, ``λ ~ Beta(m, m)``, ``π`` a
    permutation of the batch; integer inputs are left alone."""
    g1, g2 = (torch._standard_gamma(torch.tensor([m, m]), generator=gen)).tolist()
    lam = g1 / (g1 + g2) if g1 + g2 > 0 else 1.0
    mate = torch.randperm(len(x[0]), generator=gen)
    mixed = tuple(lam * t + (1 - lam) * t[mate] if t.is_floating_point() else t for t in x)
    return mixed, lam, mate


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _all_finite(loss: torch.Tensor, ddp: bool) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
    if ddp:
        torch.distributed.all_reduce(flag)
    return flag.item() == 0.0


def _score(metrics: dict[str, float]) -> float:
    """Higher is better: the negative held-out KD loss (smoother than a small set's top-1)."""
    return -metrics["kd"]


def distill(
    student: Graph,
    teacher: Graph,
    data: Any,
    options: DistillOptions | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: Callable[..., Iterable] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> dict[str, Any]:
    """Train ``student`` (in place) against ``teacher`` on ``data``; return a JSON-able report.

    ``on_epoch(stats)`` is called after every epoch (an evaluation hook); checkpoints go to
    ``options.checkpoint_dir`` or ``out_dir/distill`` when either is set.
    """
    opts = options or DistillOptions()
    wrap = progress or (lambda it, desc="", total=None: it)
    ddp = distributed.ensure_process_group()
    world, rank = (distributed.world_size(), distributed.rank()) if ddp else (1, 0)
    ckpt_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else None
    if ckpt_dir is None and out_dir is not None:
        ckpt_dir = Path(out_dir) / "distill"
    gm = student.module
    t_start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        gen = torch.Generator().manual_seed(opts.seed)
        batches = Batches(data, opts, gen, world, rank)
        labelled = batches.labelled
        if opts.alpha == 0.0 and not labelled:
            raise DataError("distill: alpha=0 trains on labels only, but the batches carry none")

        if opts.features == ("auto",):
            pairs = auto_pairs(student, teacher)
        elif opts.features == ("attention",):
            pairs = attention_pairs(student, teacher)
        else:
            pairs = parse_pairs(student, teacher, opts.features)
        s_tapped = tapped_module(gm, [p.student for p in pairs])
        t_tapped = tapped_module(teacher.module, [p.teacher for p in pairs])
        teacher_fn = _Teacher(t_tapped)

        first_x, _, first_idx = batches.epoch()[0]
        with torch.no_grad():
            was = gm.training
            gm.eval()
            s_out, s_feats = s_tapped(*first_x)
            gm.train(was)
            t_logits, t_feats = teacher_fn(first_x, None)
        s_logits = _logits(s_out, "student")
        if s_logits.shape != t_logits.shape:
            raise DistillError(
                f"distill: student output {tuple(s_logits.shape)} and teacher output "
                f"{tuple(t_logits.shape)} differ; distillation compares them element by element"
            )
        feature_loss = get_loss(opts.feature_loss)
        adapters: list[nn.Module | None] = []
        for pair, sf, tf in zip(pairs, s_feats, t_feats):
            if opts.feature_loss in NEEDS_ADAPTER:
                adapter = adapter_for(tuple(sf.shape), tuple(tf.shape), pair)
                if adapter is not None:
                    adapter.fit(sf, tf)
            else:
                adapter = None
            adapters.append(adapter)
        model: nn.Module = _Student(s_tapped, adapters)
        if ddp:
            model = nn.parallel.DistributedDataParallel(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise DistillError("distill: the student has no trainable parameters")
        opt = _optimizer(params, opts)
        steps_per_epoch = len(batches.epoch()) if not batches.pooled else None
        if steps_per_epoch is None:
            n_train = len(batches.train_idx) // world
            steps_per_epoch = -(-n_train // batches.batch_size)
        sched = _scheduler(opt, opts, steps_per_epoch * opts.epochs)
        teacher_fn.fill_cache(batches)

        history: list[EpochStats] = []
        best: tuple[tuple[float, float], int, dict] | None = None
        stale = 0
        start_epoch = 0
        if opts.resume:
            start_epoch, best, history = resume(ckpt_dir, model, opt, sched, gen)
        inner = model.module if ddp else model

        def evaluate() -> dict[str, float]:
            kd_sum = correct = agree = seen = 0.0
            gm.eval()
            with torch.no_grad():
                for x, y, idx in batches.holdout():
                    s, _ = inner(*x)
                    t, _ = teacher_fn(x, idx)
                    kd_sum += float(kd_loss(s, t, opts.temperature)) * len(s)
                    agree += float((s.argmax(1) == t.argmax(1)).sum())
                    if y is not None:
                        correct += float((s.argmax(1) == y).sum())
                    seen += len(s)
            metrics = {"kd": kd_sum / seen, "agreement": agree / seen}
            if labelled:
                metrics["top1"] = correct / seen
            return metrics

        bar = wrap(range(start_epoch, opts.epochs), desc="distill", total=opts.epochs - start_epoch)
        masked = bool(masks_of(gm))
        sparsity = schedule_of(gm)
        if sparsity is not None:
            sparsity.epochs = sparsity.epochs or opts.epochs
        good = _state(inner)  # restored if the loss diverges
        for epoch in bar:
            t0 = time.perf_counter()
            if sparsity is not None:
                _raise_sparsity(gm, sparsity, epoch + 1)
            gm.train()
            total = count = 0.0
            for b, (x, y, idx) in enumerate(batches.epoch()):
                lam, mate = 1.0, None
                if opts.shift > 0:
                    x = tuple(_shift(t, opts.shift, gen) for t in x)
                    idx = None
                if opts.mixup > 0:
                    x, lam, mate = _mix(x, opts.mixup, gen)
                    idx = None  # the teacher must see the mixed inputs
                s_logits, s_feats = model(*x)
                t_logits, t_feats = teacher_fn(x, idx)
                kd = kd_loss(s_logits, t_logits, opts.temperature)
                if y is not None and opts.alpha < 1.0:
                    ce = F.cross_entropy(s_logits, y)
                    if mate is not None:
                        ce = lam * ce + (1 - lam) * F.cross_entropy(s_logits, y[mate])
                    loss = opts.alpha * kd + (1 - opts.alpha) * ce
                else:
                    loss = kd
                if pairs and opts.feature_weight > 0:
                    f = sum(feature_loss(s, t) for s, t in zip(s_feats, t_feats)) / len(pairs)
                    loss = loss + opts.feature_weight * f
                if not _all_finite(loss.detach(), ddp):
                    inner.load_state_dict(good)
                    gm.eval()
                    kept = (
                        f"; the last good checkpoint is {ckpt_dir / CHECKPOINT}"
                        if (ckpt_dir and (ckpt_dir / CHECKPOINT).exists())
                        else ""
                    )
                    raise DistillError(
                        f"distill: the loss became {float(loss.detach()):.3g} at epoch {epoch + 1}, batch "
                        f"{b + 1}; the student was restored to the end of epoch {epoch}{kept}. "
                        f"Lower lr (now {opts.lr:g}) or check the data for NaN/inf"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if masked:
                    apply_masks(gm)  # masked weights stay exactly zero
                total += float(loss.detach()) * len(x[0])
                count += len(x[0])
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"loss {total / count:.4f}")
            stats = EpochStats(epoch + 1, total / max(count, 1), time.perf_counter() - t0)
            if batches.has_holdout:
                stats.holdout = evaluate()
                score = _score(stats.holdout)
                if best is None or score > best[0]:
                    best, stale = (score, epoch + 1, _state(inner)), 0
                else:
                    stale += 1
            history.append(stats)
            log.info(
                "distill epoch %d/%d: loss %.4f%s",
                epoch + 1,
                opts.epochs,
                stats.loss,
                "".join(f", held-out {k} {v:.4f}" for k, v in stats.holdout.items()),
            )
            if ckpt_dir is not None and distributed.is_main():
                save_checkpoint(ckpt_dir, epoch + 1, inner, opt, sched, gen, best, history)
            good = _state(inner)
            if on_epoch is not None:
                on_epoch(stats)
            if (
                sparsity is None
                and batches.has_holdout
                and opts.patience
                and stale >= opts.patience
            ):
                log.info("distill: early stop after epoch %d (best %d)", epoch + 1, best[1])
                break
        if sparsity is not None:
            set_schedule(gm, None)  # reached: later training keeps the final masks
        elif best is not None and history and best[1] != history[-1].epoch:
            inner.load_state_dict(best[2])
        gm.eval()
    report = _report(opts, pairs, adapters, history, best, world, labelled, ckpt_dir, t_start)
    report["resumed_at_epoch"] = start_epoch  # epochs the checkpoint had already done
    return report


def _report(opts, pairs: list[FeaturePair], adapters, history, best, world, labelled, ckpt_dir, t0):
    first = history[0].loss if history else float("nan")
    last = history[-1].loss if history else float("nan")
    report: dict[str, Any] = {
        "epochs_run": len(history),
        "best_epoch": best[1] if best else (history[-1].epoch if history else 0),
        "labelled": labelled,
        "world_size": world,
        "features": [
            {"student": p.student, "teacher": p.teacher, "adapter": a is not None}
            for p, a in zip(pairs, adapters)
        ],
        "history": [asdict(h) for h in history],
        "loss_first": first,
        "loss_last": last,
        "checkpoint": str(ckpt_dir / CHECKPOINT) if ckpt_dir else None,
        "seconds": time.perf_counter() - t0,
    }
    held = history[-1].holdout if history else {}
    tail = f", held-out top-1 {held['top1']:.3f}" if "top1" in held else ""
    report["summary"] = (
        f"{len(history)} epochs, loss {first:.3f} -> {last:.3f}"
        + (f", {len(pairs)} feature pairs" if pairs else "")
        + tail
        + (f", {world} ranks" if world > 1 else "")
    )
    return report


def teacher_for(
    spec: str | None, student: Graph, default: Graph | None, trust_pickle: bool = False
) -> Graph:
    """The teacher graph: from ``spec`` (a saved module or model spec) or ``default``."""
    if spec:
        return _teacher_graph(spec, student, trust_pickle)
    if default is None:
        raise DistillError(
            "distill: no teacher; run it in a pipeline (the traced model teaches) or set "
            "teacher=PATH.pt"
        )
    return default


__all__ = ["DistillOptions", "EpochStats", "distill", "teacher_for"]
