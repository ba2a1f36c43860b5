"""Data-parallel helpers: which process this is under torchrun, a barrier that waits on the CPU, and a
training order that gives the ranks equal work."""
from __future__ import annotations

import datetime
import functools
import os

import numpy as np
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


def balanced_order(lengths: list[int], batch_size: int, world: int, seed: int) -> list[int]:
    """A random order of row indices, dealt so that the `world` micro-batches trained at the same
    moment (consecutive batches of `batch_size`: accelerate gives batch k to rank k % world) hold
    about the same number of tokens. Each group of world x batch_size random rows goes, longest
    first, to the rank with the fewest tokens so far; a last short group keeps its random order."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    group = batch_size * world
    out: list[int] = []
    for start in range(0, len(order), group):
        chunk = order[start:start + group]
        if len(chunk) < group:
            out.extend(int(i) for i in chunk)
            break
        bins: list[list[int]] = [[] for _ in range(world)]
        load = [0] * world
        for i in sorted(chunk, key=lambda i: -lengths[i]):
            rank = min((r for r in range(world) if len(bins[r]) < batch_size), key=lambda r: load[r])
            bins[rank].append(int(i))
            load[rank] += lengths[i]
        out.extend(i for b in bins for i in b)
    return out


class RankBalancedSampler(torch.utils.data.Sampler):
    """Training order under DDP: every optimizer step waits for its slowest rank, and with random
    rows one rank's micro-batch is often ~10 % longer than the other's (2 GPUs, 8 rows of arena
    lengths); balancing the token counts removes that wait. Reseeded per epoch."""

    def __init__(self, lengths: list[int], batch_size: int, world: int, seed: int):
        super().__init__()
        self.lengths, self.batch_size, self.world, self.seed, self.epoch = lengths, batch_size, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(balanced_order(self.lengths, self.batch_size, self.world, self.seed + self.epoch))
