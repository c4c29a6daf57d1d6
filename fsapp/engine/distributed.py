"""Many devices: one process per device under ``torchrun``, joined by ``torch.distributed``.

The training loop calls :func:`setup` once. Without ``WORLD_SIZE > 1`` in the environment it
returns a one-process :class:`Dist` and every helper here is the identity, so single-device
code pays nothing. Under ``torchrun --nproc_per_node N -m fsapp train ...`` each process joins
the group named by ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (nccl on CUDA, gloo on the CPU) and
trains on ``cuda:LOCAL_RANK`` (or the CPU).

Conventions the loop relies on (docs/benchmarks.md, "Many devices"):

- ``data.batch_size`` is the *global* batch: every rank draws the same global batch (same order,
  same augmentation) and takes its share (:func:`shard_rows`), so the optimisation is the one of a
  single device; the transport plan couples the samples within each rank's share, as in the
  paper's multi-GPU runs.
- the perturbation runs on the local module (:func:`unwrap`), never through the DDP wrapper, with
  the BatchNorm statistics of rank 0 (:func:`broadcast_buffers` before each step); the training
  forward/backward goes through DDP (gradients averaged over ranks).
- rank 0 writes the run directory, the metrics and the checkpoints; every rank's RNG state is
  gathered into the checkpoint so a resumed run (same world size) continues bit-identically.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fsapp.errors import UsageError

__all__ = [
    "Dist",
    "agree",
    "all_gather_tensor",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_buffers",
    "broadcast_text",
    "env_world",
    "is_active",
    "restore_rng",
    "rng_state_tensors",
    "setup",
    "shard_rows",
    "shutdown",
    "state_digest",
    "state_digests",
    "unwrap",
    "wrap",
]


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""
    owns_group: bool = False

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and events."""
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` as torchrun sets them; ``(0, 1, 0)`` when absent."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return rank, world, local


def is_active() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device: torch.device, timeout_s: float = 1800.0) -> Dist:
    """Join the torchrun group (if any) and pick this rank's device.

    ``device`` is the configured one (``pick_device``): CUDA becomes ``cuda:LOCAL_RANK`` (an
    explicit ``cuda:N`` is refused with more than one process, as every rank would share it).
    """
    rank, world, local = env_world()
    if world == 1:
        return Dist(device=device)
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; run one process")
    if device.type == "cuda":
        if device.index is not None and device.index != local and torch.cuda.device_count() > 1:
            raise UsageError("with several processes use run.device=auto or cuda (each rank takes cuda:LOCAL_RANK)")
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"distributed training runs on CUDA (nccl) or the CPU (gloo), not {device.type}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), local, device, dist.get_backend(), owns)


def shutdown(d: Dist) -> None:
    """Leave the group if :func:`setup` created it."""
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op in one process)."""
    if d.active:
        if d.backend == "nccl":
            dist.barrier(device_ids=[d.device.index])
        else:
            dist.barrier()


def any_rank(flag: Tensor) -> Tensor:
    """A 0-dim bool that is True on every rank if it is True on any; asynchronous on nccl."""
    if not is_active():
        return flag
    buf = flag.to(torch.int32)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.bool()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Element-wise sum over ranks, in place on a copy (identity in one process)."""
    if not is_active():
        return t
    buf = t.clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf


def _comm_device(d: Dist) -> torch.device:
    return d.device if d.backend == "nccl" else torch.device("cpu")


def agree(flags: list[bool], d: Dist) -> list[bool]:
    """Each flag True on every rank if it is True on any (one small all-reduce; a host sync)."""
    if not d.active:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=_comm_device(d))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_gather_tensor(t: Tensor, d: Dist) -> list[Tensor]:
    """Every rank's ``t`` (same shape and dtype on all ranks), on the CPU, indexed by rank."""
    if not d.active:
        return [t.detach().cpu()]
    src = t.detach().to(_comm_device(d)).contiguous()
    out = [torch.empty_like(src) for _ in range(d.world_size)]
    dist.all_gather(out, src)
    return [o.cpu() for o in out]


def broadcast_text(text: str, d: Dist, src: int = 0) -> str:
    """Rank ``src``'s string on every rank (sent as bytes: nothing is pickled)."""
    if not d.active:
        return text
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=_comm_device(d))
    dist.broadcast(size, src=src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=_comm_device(d))
    if d.rank == src:
        buf.copy_(data)
    dist.broadcast(buf, src=src)
    return bytes(buf.cpu().tolist()).decode("utf-8")


def rng_state_tensors(d: Dist) -> dict[str, Tensor]:
    """Every rank's RNG states (torch, and its own CUDA device's), gathered for rank 0 to store in
    the checkpoint as ``extra.rng.rank<r>.<kind>``; empty in one process (the checkpoint's own
    RNG fields suffice there)."""
    if not d.active:
        return {}
    out: dict[str, Tensor] = {}
    kinds = {"torch": torch.get_rng_state()}
    if d.device.type == "cuda":
        kinds["cuda"] = torch.cuda.get_rng_state(d.device)
    for kind, state in kinds.items():
        for r, s in enumerate(all_gather_tensor(state, d)):
            out[f"extra.rng.rank{r}.{kind}"] = s
    return out


def restore_rng(extra: dict[str, Tensor], d: Dist) -> None:
    """Set this rank's RNG states from a checkpoint's ``extra`` tensors (see :func:`rng_state_tensors`)."""
    if not d.active:
        return
    state = extra.get(f"extra.rng.rank{d.rank}.torch")
    if state is not None:
        torch.set_rng_state(state.to(torch.uint8))
    state = extra.get(f"extra.rng.rank{d.rank}.cuda")
    if state is not None and d.device.type == "cuda":
        torch.cuda.set_rng_state(state.to(torch.uint8), d.device)


def shard_rows(t: Tensor, d: Dist) -> Tensor:
    """This rank's share of a global batch: contiguous chunks whose sizes differ by at most one."""
    if not d.active:
        return t
    return t.tensor_split(d.world_size)[d.rank]


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (a compiled module stays compiled)."""
    from torch.nn.parallel import DistributedDataParallel

    return net.module if isinstance(net, DistributedDataParallel) else net


def wrap(net: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP around ``net`` (identity in one process). Buffers are synchronised by
    :func:`broadcast_buffers` at the start of each step, not by DDP's forward."""
    if not d.active:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, forward_sync_buffers=False)


def broadcast_buffers(module: torch.nn.Module, d: Dist, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) to every rank: two collectives, no sync."""
    if not d.active:
        return
    groups: dict[torch.dtype, list[Tensor]] = {}
    for b in module.buffers():
        groups.setdefault(b.dtype, []).append(b)
    for bufs in groups.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for b in bufs:
                n = b.numel()
                b.copy_(flat[offset:offset + n].view_as(b))
                offset += n


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of a module's state dict: equal digests mean identical weights."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def state_digests(module: torch.nn.Module, d: Dist) -> list[str]:
    """:func:`state_digest` of every rank's ``module``, indexed by rank (all equal when in sync)."""
    mine = torch.tensor(list(bytes.fromhex(state_digest(module))), dtype=torch.uint8)
    return [bytes(t.tolist()).hex() for t in all_gather_tensor(mine, d)]
