"""Calibration across processes with torch.distributed: who am I, how the chunks are split, summing statistics.

Everything here is a no-op without an initialised process group, so single-process code calls it
unconditionally. Under `torchrun` (or after `torch.distributed.init_process_group` in the API) each rank
runs its share of the calibration chunks (`shard`) and statistics are summed with `all_reduce_sum`
(gloo on CPU, NCCL on GPU), so every rank holds the same totals and applies the same deterministic update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    """Whether a process group is initialised (torch.distributed available and init_process_group called)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes calibrate together (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0: the one that writes files and prints the report."""
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: a contiguous slice, the first `len % world` ranks one item longer.

    Chunks are split whole (never re-batched), so each chunk is computed with the same shapes on every
    layout of ranks and per-chunk statistics are bit-identical to a single process's. A rank may get
    no chunk at all; it must still take part in every `all_reduce_sum`.
    """
    world, me = world_size(), rank()
    base, extra = divmod(len(items), world)
    start = me * base + min(me, extra)
    return list(items[start:start + base + (1 if me < extra else 0)])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place and return it (unchanged without a process group).

    NCCL reduces only device tensors: a CPU tensor then makes a round trip through the current GPU.
    """
    if not active() or world_size() == 1:
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device)
        tensor.copy_(on_device)
        return tensor
    dist.all_reduce(tensor)
    return tensor
