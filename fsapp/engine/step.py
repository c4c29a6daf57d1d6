"""One training step, shared by the training loop and the benchmark."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fsapp.losses import compute_dtype, soft_cross_entropy


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16``/``fp16``; a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def outer_loss(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    """Label-smoothed soft cross-entropy (paper convention) when smoothing > 0, else cross-entropy;
    in float32 for half-precision logits (float64 stays float64)."""
    logits = logits.to(compute_dtype(logits.dtype))
    return soft_cross_entropy(logits, y, smoothing) if smoothing > 0 else F.cross_entropy(logits, y)


def training_step(
    net: torch.nn.Module,
    perturb: Callable[[torch.nn.Module, Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: Tensor,
    y: Tensor,
    smoothing: float,
    precision: str = "fp32",
    *,
    sync: bool = True,
) -> tuple[Tensor, Tensor, bool | Tensor]:
    """Perturb (eval mode), then one train-mode forward/backward and optimiser step.

    Returns ``(loss, logits, applied)``. A non-finite loss skips the batch entirely: parameters,
    optimiser state and buffers (BatchNorm statistics) stay as they were and ``applied`` is False.
    In a process group the decision is collective (one rank's non-finite loss skips the batch on
    every rank, whose averaged gradients it would poison).

    ``sync=True``: ``applied`` is a bool, read with one host-device sync (free on the CPU).
    ``sync=False``: no host-device sync at all; the skip happens on the device (``torch.where``
    over parameters, optimiser state and buffers) and ``applied`` is a 0-dim bool tensor for the
    caller to read when it syncs anyway (every ``log_every`` steps). With a gradient scaler
    (fp16) the scaler's own overflow check decides the optimiser step.
    """
    from fsapp.engine.distributed import any_rank

    buffers = list(net.buffers())
    saved = [b.detach().clone() for b in buffers]
    with autocast(x.device, precision):
        x_adv = perturb(net, x, y)
        net.train()
        logits = net(x_adv)
        loss = outer_loss(logits, y, smoothing)
    optimizer.zero_grad(set_to_none=True)
    bad = any_rank(~torch.isfinite(loss.detach()))
    if sync:
        if bool(bad):
            _restore(buffers, saved)
            return loss.detach(), logits.detach(), False
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach(), logits.detach(), True
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        _step_unless(bad, optimizer)
    optimizer.zero_grad(set_to_none=True)
    _restore(buffers, saved, bad)
    return loss.detach(), logits.detach(), ~bad


@torch.no_grad()
def _restore(tensors: list[Tensor], saved: list[Tensor], when: Tensor | None = None) -> None:
    """Put ``saved`` back into ``tensors`` (where ``when`` holds, if given)."""
    for t, old in zip(tensors, saved, strict=True):
        t.copy_(old if when is None else torch.where(when, old, t))


@torch.no_grad()
def _step_unless(bad: Tensor, optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` undone on the device where ``bad`` holds: parameters and state tensors
    go back to their values; state created by this step goes back to zeros (the same as no state
    for SGD without dampening, Adam and their kin)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    old_params = [p.detach().clone() for p in params]
    old_state = {p: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                 for p in params if p in optimizer.state}
    optimizer.step()
    _restore(params, old_params, bad)
    for p in params:
        for key, value in optimizer.state[p].items():
            if torch.is_tensor(value):
                old = old_state.get(p, {}).get(key)
                value.copy_(torch.where(bad, old if old is not None else torch.zeros_like(value), value))
