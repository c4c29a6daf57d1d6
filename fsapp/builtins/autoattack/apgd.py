"""APGD (Croce & Hein 2020): PGD with momentum and an automatic step-size schedule; CE, DLR and
targeted DLR losses. Follows the reference (fra31/auto-attack ``autopgd_base.py``, as ported to
torchattacks) draw for draw."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from fsapp.adversary import eval_mode, input_grad_mode
from fsapp.builtins.autoattack.common import (
    LinfAttack,
    bshape,
    ce_per_sample,
    check_common,
    keep_fooled,
    logits_of,
    seed_draws,
)
from fsapp.losses import compute_dtype

LossFn = Callable[[Tensor, Tensor], Tensor]


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (untargeted), per sample; needs at least 3 classes."""
    z = logits.to(compute_dtype(logits.dtype))
    z_sorted, ind_sorted = z.sort(dim=1)
    ind = (ind_sorted[:, -1] == y).float()
    u = torch.arange(z.shape[0], device=z.device)
    return -(z[u, y] - z_sorted[:, -2] * ind - z_sorted[:, -1] * (1.0 - ind)) / (
        z_sorted[:, -1] - z_sorted[:, -3] + 1e-12
    )


def dlr_loss_targeted(logits: Tensor, y: Tensor, y_target: Tensor) -> Tensor:
    """Targeted DLR loss, per sample; needs at least 4 classes."""
    z = logits.to(compute_dtype(logits.dtype))
    z_sorted, _ = z.sort(dim=1)
    u = torch.arange(z.shape[0], device=z.device)
    return -(z[u, y] - z[u, y_target]) / (z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4] + 1e-12)




MALT_CANDIDATES = 20
"""MALT ordering scores at most this many classes (the highest logits) per point."""


def malt_order(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Wrong classes nearest first by the linearised L-inf distance to their decision boundary,
    ``(z_y - z_t) / ||grad_x (z_y - z_t)||_1`` (MALT, Melamed et al. 2024), per point: ``[n, k-1]``.

    Among more than ``MALT_CANDIDATES`` classes only the highest logits are scored (the rest follow
    in logit order). Costs one forward and one backward per scored class.
    """
    with input_grad_mode():
        xg = x.detach().clone().requires_grad_(True)
        z = model(xg)
        n, k = z.shape
        u = torch.arange(n, device=x.device)
        by_logit = z.detach().clone()
        by_logit[u, y] = -float("inf")
        ranked = by_logit.argsort(dim=1, descending=True)[:, : k - 1]
        scored = min(k - 1, MALT_CANDIDATES)
        zy = z[u, y]
        dist = torch.empty(n, scored, device=x.device)
        for j in range(scored):
            diff = zy - z[u, ranked[:, j]]
            (g,) = torch.autograd.grad(diff.sum(), xg, retain_graph=j < scored - 1)
            dist[:, j] = diff.detach() / (g.flatten(1).abs().sum(1) + 1e-12)
        nearest = ranked[:, :scored].gather(1, dist.argsort(dim=1))
        return torch.cat([nearest, ranked[:, scored:]], dim=1)


def _apgd_run(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, rho: float,
              loss_fn: LossFn) -> tuple[Tensor, Tensor]:
    """One APGD run from a random start; returns (robust after every iterate, first fooling iterate)."""
    n = x.shape[0]
    shape = bshape(x)
    steps_2, steps_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    t = 2 * torch.rand(x.shape).to(x.device) - 1
    x_adv = x + eps * torch.ones(n, *([1] * (x.dim() - 1)), device=x.device) * t / (
        t.reshape(n, -1).abs().max(dim=1, keepdim=True)[0].reshape(shape)
    )
    x_adv = x_adv.clamp(0.0, 1.0)
    x_best = x_adv.clone()
    x_best_adv = x_adv.clone()
    loss_steps = torch.zeros(steps, n, device=x.device)

    x_adv.requires_grad_(True)
    logits = model(x_adv)
    loss_indiv = loss_fn(logits, y)
    grad = torch.autograd.grad(loss_indiv.sum(), [x_adv])[0].detach()
    x_adv = x_adv.detach()
    grad_best = grad.clone()
    acc = logits.detach().max(1)[1] == y
    loss_best = loss_indiv.detach().clone()

    step_size = eps * torch.ones(n, *([1] * (x.dim() - 1)), device=x.device) * 2.0
    x_adv_old = x_adv.clone()
    k = steps_2
    counter3 = 0
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones(n, dtype=torch.bool, device=x.device)

    for i in range(steps):
        with torch.no_grad():
            grad2 = x_adv - x_adv_old
            x_adv_old = x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            x_adv_1 = x_adv + step_size * torch.sign(grad)
            x_adv_1 = torch.clamp(torch.min(torch.max(x_adv_1, x - eps), x + eps), 0.0, 1.0)
            x_adv_1 = torch.clamp(
                torch.min(torch.max(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a), x - eps), x + eps), 0.0, 1.0
            )
            x_adv = x_adv_1 + 0.0

        x_adv.requires_grad_(True)
        logits = model(x_adv)
        loss_indiv = loss_fn(logits, y)
        grad = torch.autograd.grad(loss_indiv.sum(), [x_adv])[0].detach()
        x_adv = x_adv.detach()

        with torch.no_grad():
            pred = logits.detach().max(1)[1] == y
            acc = acc & pred
            x_best_adv = torch.where((~pred).view(shape), x_adv, x_best_adv)
            y1 = loss_indiv.detach().float()
            loss_steps[i] = y1
            better = y1 > loss_best
            x_best = torch.where(better.view(shape), x_adv, x_best)
            grad_best = torch.where(better.view(shape), grad, grad_best)
            loss_best = torch.where(better, y1, loss_best)

            counter3 += 1
            if counter3 == k:
                rows = torch.tensor([(i - c) % steps for c in range(k)], device=x.device)
                prev = torch.tensor([(i - c - 1) % steps for c in range(k)], device=x.device)
                increases = (loss_steps[rows] > loss_steps[prev]).sum(0)
                fl_osc = increases <= k * rho
                fl_reduce_no_impr = (~reduced_last_check) & (loss_best_last_check >= loss_best)
                fl_osc = fl_osc | fl_reduce_no_impr
                reduced_last_check = fl_osc.clone()
                loss_best_last_check = loss_best.clone()
                osc = fl_osc.view(shape)
                step_size = torch.where(osc, step_size / 2.0, step_size)
                x_adv = torch.where(osc, x_best, x_adv)
                grad = torch.where(osc, grad_best, grad)
                counter3 = 0
                k = max(k - size_decr, steps_min)
    return acc, x_best_adv


def apgd(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255, steps: int = 100, restarts: int = 1,
         loss: str = "ce", targets: int = 0, rho: float = 0.75, seed: int | None = None,
         strict: bool = True, order: str = "logits") -> Tensor:
    """APGD with ``loss`` "ce" or "dlr", or targeted DLR over ``targets`` classes (``targets > 0``):
    the highest logits of the points still robust (``order="logits"``, the reference) or the
    nearest boundaries by :func:`malt_order` computed once on the clean points (``"malt"``).

    Each restart (and each target class) runs only on the points still robust; a point fooled at
    any iterate returns that iterate. With too few classes for the loss (DLR: 3, targeted: 4) it
    raises, or with ``strict=False`` returns ``x`` unchanged (AutoAttack skips the stage).
    """
    with input_grad_mode(), eval_mode(model):
        x = x.detach().clone()
        y = y.detach().clone()
        adv = x.clone()
        logits = logits_of(model, x)
        acc = logits.max(1)[1] == y
        n_classes = logits.shape[1]
        seed_draws(seed)
        needed = 4 if targets > 0 else 3 if loss == "dlr" else 2
        if n_classes < needed:
            if strict:
                raise ValueError(f"APGD with this loss needs at least {needed} classes, the model has {n_classes}")
            return adv
        ranks: list[int | None] = list(range(2, min(targets, n_classes - 1) + 2)) if targets > 0 else [None]
        nearest = malt_order(model, x, y) if targets > 0 and order == "malt" else None
        for rank in ranks:
            for _ in range(restarts):
                ind = acc.nonzero().flatten()
                if ind.numel() == 0:
                    break
                xs, ys = x[ind], y[ind]
                if rank is not None:
                    if nearest is not None:
                        y_target = nearest[ind, rank - 2]
                    else:
                        y_target = logits_of(model, xs).sort(dim=1)[1][:, -rank]

                    def loss_fn(z: Tensor, t: Tensor, y_target: Tensor = y_target) -> Tensor:
                        return dlr_loss_targeted(z, t, y_target)
                else:
                    loss_fn = ce_per_sample if loss == "ce" else dlr_loss
                acc_curr, adv_curr = _apgd_run(model, xs, ys, eps, steps, rho, loss_fn)
                keep_fooled(acc, adv, ind, ~acc_curr, adv_curr)
        return adv.detach()



@dataclass
class APGDParams:
    """APGD (Croce & Hein 2020): PGD with momentum and an automatic step-size schedule."""

    eps: float = 8 / 255
    steps: int = 100
    restarts: int = 1
    rho: float = 0.75
    seed: int | None = None

    def __post_init__(self) -> None:
        check_common(self.eps, self.restarts)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")


@dataclass
class APGDTParams(APGDParams):
    """APGD-T: targeted DLR loss, one run per target class (the top ``targets`` wrong classes)."""

    targets: int = 9
    order: str = "logits"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets < 1:
            raise ValueError(f"targets must be >= 1, got {self.targets}")
        if self.order not in ("logits", "malt"):
            raise ValueError(f"order must be logits or malt, got {self.order!r}")



class APGD(LinfAttack):
    """``apgd-ce`` / ``apgd-dlr`` / ``apgd-t``: ``attack(model, x, y) -> x_adv``."""

    def __init__(self, p: APGDParams, loss: str = "ce", targets: int = 0, strict: bool = True,
                 order: str = "logits") -> None:
        self.eps, self.steps, self.restarts, self.rho, self.seed = p.eps, p.steps, p.restarts, p.rho, p.seed
        self.loss = "margin" if loss == "dlr" or targets else "ce"
        self.dlr = loss == "dlr"
        self.targets = targets
        self.strict = strict
        self.order = getattr(p, "order", order)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return apgd(model, x, y, self.eps, self.steps, self.restarts, "dlr" if self.dlr else "ce", self.targets,
                    self.rho, self.seed, self.strict, self.order)

