"""Distillation checkpoints: written atomically after every epoch, read back by ``resume=true``.

A checkpoint holds state dicts, the random generators' states and the epoch history: tensors,
numbers, strings, lists and dicts only, so it loads with ``torch.load(weights_only=True)`` and
a planted file cannot run code.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from graphopt.atomic import atomic_path
from graphopt.errors import DistillError

log = logging.getLogger(__name__)

CHECKPOINT = "distill.pt"


@dataclass
class EpochStats:
    epoch: int
    loss: float
    seconds: float
    holdout: dict[str, float] = field(default_factory=dict)


def save_checkpoint(ckpt_dir: Path, epoch, inner, opt, sched, gen, best, history) -> None:
    state = {
        "format": 1,
        "epoch": epoch,
        "model": inner.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "best": best,
        "history": [asdict(h) for h in history],
    }
    with atomic_path(ckpt_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def resume(ckpt_dir: Path | None, model, opt, sched, gen):
    path = ckpt_dir / CHECKPOINT if ckpt_dir else None
    if path is None or not path.exists():
        log.warning("distill: resume=true but no checkpoint at %s; starting from epoch 1", path)
        return 0, None, []
    state = torch.load(path, weights_only=True)  # a checkpoint holds tensors and numbers only
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    try:
        inner.load_state_dict(state["model"])
    except RuntimeError as e:
        raise DistillError(
            f"distill: the checkpoint {path} does not fit this student (was it written by a "
            f"different pipeline?): {str(e).splitlines()[0]}"
        ) from e
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    history = [EpochStats(**h) for h in state["history"]]
    log.info("distill: resumed from %s after epoch %d", path, state["epoch"])
    return state["epoch"], state["best"], history
