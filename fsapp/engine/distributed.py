"""Devices and processes: the device a command runs on, and one process per device under
``torchrun`` joined by ``torch.distributed`` (training with DDP, evaluation sharded by batch).

:func:`pick_device` checks a device name once, for every command (train, eval, bench).

Training calls :func:`setup` once. Without ``WORLD_SIZE > 1`` in the environment it
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

Evaluation (:class:`Shard`, :func:`init_from_env`, :func:`all_sum`, ...): batches of the fixed
sample order are dealt round-robin to ranks (batch ``b`` belongs to rank ``b % world``). Every
batch is seeded from its global index, so each sample meets the same attack draws as in a single
process, and summing the per-sample masks over ranks gives exactly the single-process totals.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fsapp.devices import check_device_name
from fsapp.errors import UsageError

__all__ = [
    "Dist",
    "Shard",
    "agree",
    "all_max",
    "all_sum",
    "all_gather_tensor",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_buffers",
    "broadcast_text",
    "cuda_rng_keys",
    "cuda_rng_tensors",
    "current",
    "env_world",
    "env_world_size",
    "finish",
    "init_from_env",
    "is_active",
    "local_device",
    "model_digest",
    "pick_device",
    "restore_cuda_rng",
    "restore_rng",
    "rng_state_tensors",
    "setup",
    "shard_rows",
    "shutdown",
    "state_digests",
    "tensor_digest",
    "unwrap",
    "valid_devices",
    "wrap",
]

_DEVICE = re.compile(r"auto|cpu|cuda(?::([0-9]+))?")


def valid_devices() -> list[str]:
    """The device names this torch build can run: auto, cpu, and cuda, cuda:0, ... when CUDA is there."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names


def pick_device(name: str) -> torch.device:
    """The device called ``name``, checked once for every command: ``auto`` (CUDA when present,
    else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` for a device that exists. Anything else (mps,
    tpu, ``cuda:x``, an empty name) is one line naming the valid choices."""
    valid = ", ".join(valid_devices())
    try:
        check_device_name(name)  # the spelling: one rule for every command and config key
    except UsageError:
        raise UsageError(f"unknown device {name!r}; valid here: {valid}") from None
    match = _DEVICE.fullmatch(name)
    if match is None:
        raise UsageError(f"unknown device {name!r}; valid here: {valid}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"device '{name}' asked for, but this torch build sees no CUDA device; valid here: {valid}")
    if match.group(1) is None:
        return torch.device("cuda")
    index = int(match.group(1))
    if index >= torch.cuda.device_count():
        raise UsageError(f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA devices); "
                         f"valid here: {valid}")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
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
    return Dist(dist.get_rank(), dist.get_world_size(), device, dist.get_backend(), owns)


def shutdown(d: Dist) -> None:
    """Leave the group if :func:`setup` created it."""
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist | None = None) -> None:
    """Wait for every rank (no-op in one process); without ``d``, the initialised group if any."""
    if d is None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return
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


def cuda_rng_keys(keys: list[str] | set[str], prefix: str = "rng.cuda.") -> list[str]:
    """The keys ``<prefix><index>`` ordered by device index (``rng.cuda.2`` before ``rng.cuda.10``,
    which a string sort gets wrong); other keys are left out."""
    indexed = [(int(k[len(prefix):]), k) for k in keys
               if k.startswith(prefix) and k[len(prefix):].isdigit()]
    return [k for _, k in sorted(indexed)]


def cuda_rng_tensors(prefix: str = "extra.rng.cuda.") -> dict[str, Tensor]:
    """Every CUDA device's RNG state as ``<prefix><index>`` (empty without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    return {f"{prefix}{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}


def restore_cuda_rng(tensors: dict[str, Tensor], prefix: str = "extra.rng.cuda.") -> bool:
    """Set every CUDA device's RNG state from ``<prefix><index>`` tensors, by device index; False
    (nothing set) without CUDA or when the count does not match this machine's devices."""
    keys = cuda_rng_keys(set(tensors), prefix)
    if not keys or not torch.cuda.is_available() or len(keys) != torch.cuda.device_count():
        return False
    torch.cuda.set_rng_state_all([tensors[k].to(torch.uint8) for k in keys])
    return True


def shard_rows(t: Tensor, d: Dist) -> Tensor:
    """This rank's share of a global batch: contiguous chunks whose sizes differ by at most one."""
    if not d.active:
        return t
    return t.tensor_split(d.world_size)[d.rank]


def unwrap(net: torch.nn.Module, *, compiled: bool = True) -> torch.nn.Module:
    """The module inside a DDP wrapper; a compiled module stays compiled unless ``compiled=False``
    (then the module whose weights these are)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(net, DistributedDataParallel):
        net = net.module
    if not compiled:
        net = getattr(net, "_orig_mod", net)
    return net


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


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 (hex) of the tensors' shapes, dtypes and bytes (any dtype), in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(module: torch.nn.Module) -> str:
    """SHA-256 (hex) of a module's state dict: names, shapes, dtypes and values. Equal digests mean
    identical weights and buffers; the evaluator's resume state and ``ddp.json`` both use it."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_digest(value).encode())
    return h.hexdigest()


def state_digests(module: torch.nn.Module, d: Dist) -> list[str]:
    """:func:`model_digest` of every rank's ``module``, indexed by rank (all equal when in sync)."""
    mine = torch.tensor(list(bytes.fromhex(model_digest(module))), dtype=torch.uint8)
    return [bytes(t.tolist()).hex() for t in all_gather_tensor(mine, d)]


# -- evaluation sharding -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` evaluation processes."""

    rank: int = 0
    world: int = 1

    def owns(self, batch: int) -> bool:
        """Whether batch number ``batch`` is this process's to evaluate."""
        return batch % self.world == self.rank

    @property
    def active(self) -> bool:
        """More than one process."""
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


def all_sum(values: Tensor) -> Tensor:
    """Element-wise sum over ranks (identity in one process); returns a tensor on the input's device."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    buf = values.to(_reduce_device(values.device), torch.float64 if values.is_floating_point() else torch.int64)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(values.device, values.dtype)


def all_max(values: Tensor) -> Tensor:
    """Element-wise maximum over ranks (identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    buf = values.to(_reduce_device(values.device), torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.to(values.device, values.dtype)


def finish() -> None:
    """Leave the process group (if this module's caller joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
