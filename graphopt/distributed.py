"""Running under ``torchrun``: which rank this process is, and whether it writes outputs.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`ensure_process_group` joins the group (gloo on CPU, NCCL when CUDA is
available) the first time a pass needs it. Rank 0 alone writes files.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in the process that writes outputs (rank 0, or the only process)."""
    return rank() == 0


def ensure_process_group() -> bool:
    """Join the process group if launched by torchrun with ``WORLD_SIZE > 1``; return whether
    training should be distributed."""
    if world_size() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return True
