"""What the AutoAttack components share: the reference's reseeding, batch shapes, the losses."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fsapp.adversary import Attack
from fsapp.losses import compute_dtype


def seed_draws(seed: int | None) -> None:
    """Reseed like the reference does at the start of each attack (``None``: keep the stream).

    Every random draw of these attacks is made on the CPU and moved to the data's device (as in the
    reference), so only the default CPU generator is seeded; no CUDA generator is touched.
    """
    if seed is not None:
        torch.random.default_generator.manual_seed(seed)


def keep_fooled(acc: Tensor, adv: Tensor, ind: Tensor, fooled: Tensor, adv_curr: Tensor) -> None:
    """Record one run on the still-robust points ``ind``: those it ``fooled`` stop being robust
    and keep its example (the per-sample worst case every AutoAttack component accumulates)."""
    acc[ind[fooled]] = False
    adv[ind[fooled]] = adv_curr[fooled]


def bshape(x: Tensor) -> tuple[int, ...]:
    """``(-1, 1, 1, ...)``: a per-sample value broadcast over ``x``'s other dimensions."""
    return (-1,) + (1,) * (x.dim() - 1)


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits without a graph."""
    return model(x)


def ce_per_sample(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per sample (float32 for half logits)."""
    return F.cross_entropy(logits.to(compute_dtype(logits.dtype)), y, reduction="none")


def check_common(eps: float, restarts: int) -> None:
    """The parameter checks every component makes."""
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be >= 0, got {eps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")


class LinfAttack(Attack):
    """An AutoAttack component: L-inf, gradient access, cross-entropy unless it says otherwise."""

    norm = "Linf"
    access = "gradient"
    loss = "ce"
    eps: float
