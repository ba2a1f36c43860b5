"""Data-parallel helpers: which process this is under torchrun, and a barrier that waits on the CPU."""
from __future__ import annotations

import datetime
import functools
import os

import torch


def dist_rank() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) unless launched by torchrun / accelerate launch."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@functools.cache
def _wait_group():
    # A CPU (gloo) group for waiting: an NCCL barrier would keep a kernel spinning on every waiting
    # GPU while rank 0 scores the held-out fold on all of them.
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=4))


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier(group=_wait_group())
