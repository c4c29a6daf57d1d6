"""Evaluation attacks: ``attack(model, x, y) -> x_adv`` (L-inf, inputs in [0, 1]).

Every attack runs the model in eval mode (each module's mode is restored afterwards), enables
autograd even when called under ``no_grad``/``inference_mode``, differentiates w.r.t. the input
only, and returns detached, finite examples inside the eps-ball and [0, 1].

With ``keep="worst"`` (the default) an attack tracks, per sample and without host syncs inside
the loop, every iterate of every restart: a sample misclassified at ANY iterate returns the first
such iterate; otherwise the last iterate. ``keep="last"`` returns the final iterate of the last
restart, which is what torchattacks returns (``pgd`` computes exactly like ``torchattacks.PGD``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from fsapp.adversary import Attack, eval_mode, input_grad_mode, linf, random_start
from fsapp.hookspecs import hookimpl
from fsapp.losses import compute_dtype, cw_margin_loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Keep = Literal["worst", "last"]

__all__ = [
    "CWParams",
    "FGSMParams",
    "IterativeAttack",
    "PGDParams",
    "ce_loss",
    "linf_attack",
]


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (as ``nn.CrossEntropyLoss()``), in float32 for half logits."""
    return F.cross_entropy(logits.to(compute_dtype(logits.dtype)), y)


def _track(
    x_iter: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    found: torch.Tensor,
    best: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Record the iterates that are misclassified for the first time (tensor masks, no sync)."""
    fooled = logits.argmax(dim=1) != y
    new = fooled & ~found
    shape = (-1,) + (1,) * (x_iter.dim() - 1)
    best = torch.where(new.view(shape), x_iter, best)
    return found | fooled, best


def linf_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = ce_loss,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 20,
    start: bool = True,
    restarts: int = 1,
    keep: Keep = "worst",
) -> torch.Tensor:
    """Signed-gradient ascent of ``loss_fn`` in the L-inf eps-ball (FGSM / PGD / CW).

    Each step: ``adv = clamp(x + clamp(adv + step * sign(grad) - x, -eps, eps), 0, 1)``.
    A random start is ``clamp(x + U(-eps, eps), 0, 1)``. See the module docstring for ``keep``.
    """
    if keep not in ("worst", "last"):
        raise ValueError(f"keep must be 'worst' or 'last', got {keep!r}")
    ball = linf(eps)
    with input_grad_mode(), eval_mode(model):
        x = x.detach().clone()
        y = y.detach().clone()
        track = keep == "worst"
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        best = x.clone() if track else x
        last = x
        for restart in range(restarts):
            if track and restart > 0 and bool(found.all()):  # one sync per restart
                break
            adv = random_start(x, eps) if start else x.clone()
            for _ in range(steps):
                adv = adv.detach().requires_grad_(True)
                logits = model(adv)
                loss = loss_fn(logits, y)
                (grad,) = torch.autograd.grad(loss, adv)
                adv = adv.detach()
                if track:
                    found, best = _track(adv, logits.detach(), y, found, best)
                adv = ball.project_step(adv + step_size * grad.sign(), x).detach()
            if track:
                with torch.no_grad():
                    found, best = _track(adv, model(adv), y, found, best)
            last = adv
        if track:
            shape = (-1,) + (1,) * (x.dim() - 1)
            return torch.where(found.view(shape), best, last).detach()
        return last.detach()


# --------------------------------------------------------------------------- parameters


def _check(eps: float, step_size: float | None, steps: int, restarts: int) -> None:
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be >= 0, got {eps}")
    if step_size is not None and not (step_size >= 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")


@dataclass
class FGSMParams:
    """FGSM: one signed step of ``step_size`` (empty: eps). The paper ran it with a random start
    U(-eps, eps) and step 8/255 (``fgsm:random_start=true``); torchattacks' FGSM has none."""

    eps: float = 8 / 255
    step_size: float | None = None
    random_start: bool = False
    keep: Keep = "worst"

    def __post_init__(self) -> None:
        _check(self.eps, self.step_size, 1, 1)
        if self.keep not in ("worst", "last"):
            raise ValueError(f"keep must be 'worst' or 'last', got {self.keep!r}")


@dataclass
class PGDParams:
    """PGD on the cross-entropy (the paper's PGD-k: step 2/255, random start)."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 20
    random_start: bool = True
    restarts: int = 1
    keep: Keep = "worst"

    def __post_init__(self) -> None:
        _check(self.eps, self.step_size, self.steps, self.restarts)
        if self.keep not in ("worst", "last"):
            raise ValueError(f"keep must be 'worst' or 'last', got {self.keep!r}")


@dataclass
class CWParams(PGDParams):
    """PGD on the CW margin loss ``-max(0, z_y - max_{j!=y} z_j + kappa)`` (the paper's CW-k)."""

    kappa: float = 50.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.kappa >= 0 and math.isfinite(self.kappa)):
            raise ValueError(f"kappa must be >= 0, got {self.kappa}")


# --------------------------------------------------------------------------- components


class IterativeAttack(Attack):
    """A configured :func:`linf_attack`: ``attack(model, x, y) -> x_adv`` (L-inf, gradient access;
    ``loss`` "ce" for FGSM/PGD, "margin" for CW)."""

    def __init__(
        self,
        name: str,
        loss_fn: LossFn,
        eps: float,
        step_size: float,
        steps: int,
        random_start: bool,
        restarts: int = 1,
        keep: Keep = "worst",
        loss: str = "ce",
    ) -> None:
        self.loss = loss
        self.name = name
        self.loss_fn = loss_fn
        self.eps = eps
        self.step_size = step_size
        self.steps = steps
        self.random_start = random_start
        self.restarts = restarts
        self.keep = keep

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return linf_attack(
            model,
            x,
            y,
            self.loss_fn,
            self.eps,
            self.step_size,
            self.steps,
            self.random_start,
            self.restarts,
            self.keep,
        )

    def __repr__(self) -> str:
        return (
            f"IterativeAttack({self.name}, eps={self.eps}, step_size={self.step_size}, "
            f"steps={self.steps}, random_start={self.random_start}, restarts={self.restarts}, "
            f"keep={self.keep})"
        )


def _fgsm(p: FGSMParams) -> IterativeAttack:
    step = p.eps if p.step_size is None else p.step_size
    return IterativeAttack("fgsm", ce_loss, p.eps, step, 1, p.random_start, 1, p.keep)


def _pgd(p: PGDParams) -> IterativeAttack:
    return IterativeAttack(
        "pgd", ce_loss, p.eps, p.step_size, p.steps, p.random_start, p.restarts, p.keep
    )


def _cw(p: CWParams) -> IterativeAttack:
    kappa = p.kappa

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cw_margin_loss(logits, y, kappa)

    return IterativeAttack(
        "cw", loss, p.eps, p.step_size, p.steps, p.random_start, p.restarts, p.keep, "margin"
    )


@hookimpl
def register_attacks(register) -> None:  # noqa: ANN001 - the hook's register callback
    """Register the built-in evaluation attacks."""
    register(
        "fgsm", _fgsm, params=FGSMParams, description="fast gradient sign method (one step, CE)"
    )
    register(
        "pgd", _pgd, params=PGDParams, description="projected gradient descent on cross-entropy"
    )
    register(
        "cw",
        _cw,
        params=CWParams,
        description="PGD on the Carlini-Wagner margin loss (kappa 50, as the paper's CW-k)",
    )
