"""One training step, shared by the training loop and the benchmark."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fsapp.losses import soft_cross_entropy


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16``/``fp16``; a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def outer_loss(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    """Label-smoothed soft cross-entropy (paper convention) when smoothing > 0, else cross-entropy."""
    logits = logits.float()
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
) -> tuple[Tensor, Tensor, bool]:
    """Perturb (eval mode), then one train-mode forward/backward and optimiser step.

    Returns ``(loss, logits, applied)``; a non-finite loss skips the update (``applied`` False).
    """
    with autocast(x.device, precision):
        x_adv = perturb(net, x, y)
        net.train()
        logits = net(x_adv)
        loss = outer_loss(logits, y, smoothing)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return loss.detach(), logits.detach(), False
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach(), True
