"""Sharding an evaluation across processes (``torchrun``): batch ownership and count reductions.

Batches of the fixed sample order are dealt round-robin to ranks (batch ``b`` belongs to rank
``b % world``). Every batch is seeded from its global index, so each sample meets the same
attack draws as in a single process, and summing the per-sample masks over ranks gives exactly
the single-process totals. Uses ``torch.distributed`` directly (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` evaluation processes."""

    rank: int = 0
    world: int = 1

    def owns(self, batch: int) -> bool:
        return batch % self.world == self.rank

    @property
    def active(self) -> bool:
        return self.world > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when absent)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def local_device(device: torch.device) -> torch.device:
    """Under torchrun with CUDA, each process takes ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_from_env(device: torch.device) -> Shard:
    """Join the process group torchrun describes (if ``WORLD_SIZE > 1``); returns this shard."""
    if env_world_size() <= 1:
        return Shard()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return current()


def current() -> Shard:
    """The shard of this process in an initialised process group, else the whole."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def _reduce_device(device: torch.device) -> torch.device:
    if dist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (identity in one process); returns a tensor on the input's device."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    buf = values.to(_reduce_device(values.device), torch.float64 if values.is_floating_point() else torch.int64)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(values.device, values.dtype)


def all_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    buf = values.to(_reduce_device(values.device), torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.to(values.device, values.dtype)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish() -> None:
    """Leave the process group (if this module's caller joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
