"""One training step, shared by the training loop and the benchmark."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from fsapp.engine.distributed import any_rank
from fsapp.losses import OuterLoss
from fsapp.method import Adversarial, as_adversarial

Perturb = Callable[[torch.nn.Module, Tensor, Tensor], "Tensor | Adversarial | tuple[Tensor, Tensor]"]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16``/``fp16``; a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def training_step(
    net: torch.nn.Module,
    perturb: Perturb,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: Tensor,
    y: Tensor,
    loss: OuterLoss | float,
    precision: str = "fp32",
    *,
    sync: bool = True,
) -> tuple[Tensor, Tensor, bool | Tensor]:
    """Perturb (eval mode), then the outer loss's train-mode forwards, backward and optimiser step.

    ``perturb`` returns ``x_adv`` or ``(x_adv, targets)`` (the contract of :mod:`fsapp.method`);
    ``loss`` is the outer loss by name (:class:`~fsapp.losses.OuterLoss`; a bare number is the
    ``soft-ce`` smoothing), which runs the forwards it needs (``f(x_adv)``; ``f(x)`` too for
    ``trades``). Returns ``(loss, logits of x_adv, applied)``. A step is skipped entirely when its
    loss is non-finite, or when its update would leave a parameter, an optimiser state tensor or a
    buffer non-finite (NaN momentum from a checkpoint, an overflowing learning rate): parameters,
    optimiser state and buffers (BatchNorm statistics) stay as they were and ``applied`` is False.
    In a process group the decision is collective (one rank's bad step skips it on every rank).

    ``sync=True``: ``applied`` is a bool, read with host-device syncs (free on the CPU).
    ``sync=False``: no host-device sync at all; the skip happens on the device (``torch.where``
    over parameters, optimiser state and buffers) and ``applied`` is a 0-dim bool tensor for the
    caller to read when it syncs anyway (every ``log_every`` steps). With a gradient scaler
    (fp16) the scaler's own overflow check decides the optimiser step first.
    """

    criterion = loss if isinstance(loss, OuterLoss) else OuterLoss("soft-ce", float(loss))
    buffers = list(net.buffers())
    saved = [b.detach().clone() for b in buffers]
    with autocast(x.device, precision):
        adv = as_adversarial(perturb(net, x, y))
        net.train()
        value, logits = criterion.on_batch(net, x, adv, y)
    optimizer.zero_grad(set_to_none=True)
    loss_bad = ~torch.isfinite(value.detach())
    if sync:
        if bool(any_rank(loss_bad)):
            _restore(buffers, saved)
            return value.detach(), logits.detach(), False
        scaler.scale(value).backward()
        undo = _Undo(optimizer)
        _optimizer_step(optimizer, scaler)
        if bool(any_rank(undo.non_finite(buffers))):
            undo.restore()
            _restore(buffers, saved)
            optimizer.zero_grad(set_to_none=True)
            return value.detach(), logits.detach(), False
        return value.detach(), logits.detach(), True
    scaler.scale(value).backward()
    undo = _Undo(optimizer)
    _optimizer_step(optimizer, scaler)
    bad = any_rank(loss_bad | undo.non_finite(buffers))
    undo.restore(bad)
    optimizer.zero_grad(set_to_none=True)
    _restore(buffers, saved, bad)
    return value.detach(), logits.detach(), ~bad


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


@torch.no_grad()
def _restore(tensors: list[Tensor], saved: list[Tensor], when: Tensor | None = None) -> None:
    """Put ``saved`` back into ``tensors`` (where ``when`` holds, if given)."""
    for t, old in zip(tensors, saved, strict=True):
        t.copy_(old if when is None else torch.where(when, old, t))


class _Undo:
    """The parameters and optimiser state one optimiser step may change, saved before it, so the
    step can be checked for finiteness and taken back."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        with torch.no_grad():
            self.old_params = [p.detach().clone() for p in self.params]
            self.old_state = {p: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                              for p in self.params if p in optimizer.state}

    @torch.no_grad()
    def non_finite(self, buffers: list[Tensor]) -> Tensor:
        """A 0-dim bool on the device: whether any parameter, state tensor or floating buffer now
        holds a NaN or an infinity (one fused pass, no host sync)."""
        state = [v for p in self.params for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        tensors = [t for t in self.params + state + buffers if t.is_floating_point() and t.numel()]
        if not tensors:
            return torch.zeros((), dtype=torch.bool)
        maxima = torch._foreach_norm(tensors, float("inf"))
        return ~torch.isfinite(torch.stack([m.to(maxima[0].device, torch.float64) for m in maxima])).all()

    @torch.no_grad()
    def restore(self, when: Tensor | None = None) -> None:
        """Take the step back (where ``when`` holds, if given). Without ``when``, state the step
        created is dropped; with it, that state goes back to zeros (the same as no state for SGD
        without dampening, Adam and their kin)."""
        _restore(self.params, self.old_params, when)
        for p in self.params:
            old = self.old_state.get(p)
            if when is None and old is None:
                self.optimizer.state.pop(p, None)
                continue
            for key, value in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    before = (old or {}).get(key)
                    before = before if before is not None else torch.zeros_like(value)
                    value.copy_(before if when is None else torch.where(when, before, value))
