"""Training methods whose perturbation brings more than ``x_adv``: Bilateral and TRADES.

``bilateral`` (Wang & Zhang, ICCV 2019) perturbs both sides of the example: the image by ONE
targeted signed step towards the most confusing class, and the label by the adversarial-label
formula computed from the clean prediction. It returns ``(x_adv, targets)`` (see
:mod:`fsapp.method`). ``trades`` (Zhang et al., ICML 2019) is the KL-PGD adversary of TRADES; its
outer loss ``method.loss = "trades"`` (CE on the clean batch plus beta times the KL term) lives in
:class:`fsapp.losses.OuterLoss`. Both run their attack passes in eval mode with the model's modes
restored afterwards, differentiate with respect to the input only, and return detached results
inside the eps-ball and [0, 1]. docs/ALGORITHM.md describes both steps and their sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from fsapp.adversary import eval_mode, input_grad_mode, random_start
from fsapp.losses import compute_dtype, smoothed_targets
from fsapp.method import Adversarial

__all__ = [
    "Bilateral",
    "BilateralParams",
    "Trades",
    "TradesParams",
    "adversarial_labels",
    "kl_pgd",
    "most_confusing",
    "targeted_step",
]


def _check_budget(epsilon: float, step_size: float, steps: int) -> None:
    for name, value in (("epsilon", epsilon), ("step_size", step_size)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be >= 0, got {value}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _clip(x_cur: torch.Tensor, x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``clip01(min(max(x_cur, x - eps), x + eps))``: the projection both reference codes write."""
    return torch.min(torch.max(x_cur, x - epsilon), x + epsilon).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- bilateral


def most_confusing(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y_MC``: per example the class other than ``y`` with the largest logit."""
    masked = logits.detach().to(compute_dtype(logits.dtype)).clone()
    masked.scatter_(1, y.long().view(-1, 1), float("-inf"))
    return masked.argmax(dim=1)


def adversarial_labels(
    logits: torch.Tensor, y: torch.Tensor, beta: float = 9.0, gamma: float = 0.01
) -> torch.Tensor:
    """Bilateral's adversarial labels ("LA") [B, K] from the clean ``logits``.

    With ``v_k = -log(p_k + 1e-8)`` (``p`` the softmax), ``v_MC = min_{k != y} v_k``,
    ``v_LL = max_{k != y} v_k`` and ``S = sum_{j != y} (v_j - v_MC + gamma)``:
    ``eps_y = 1 / (1 + beta * (v_LL - v_MC + gamma) / S)``, ``y'_k = eps_y * (v_k - v_MC + gamma) / S``
    for ``k != y`` and ``y'_y = 1 - eps_y``. Rows sum to 1 and the true class gets exactly ``beta``
    times the largest other entry (the least likely class's).
    """
    if logits.shape[1] < 2:
        raise ValueError(f"adversarial labels need at least 2 classes, got {logits.shape[1]}")
    p = F.softmax(logits.detach().to(compute_dtype(logits.dtype)), dim=1)
    v = -torch.log(p + 1e-8)
    true = F.one_hot(y.long(), v.shape[1]).bool()
    v_mc = v.masked_fill(true, float("inf")).amin(dim=1, keepdim=True)
    v_ll = v.masked_fill(true, float("-inf")).amax(dim=1, keepdim=True)
    shifted = (v - v_mc + gamma).masked_fill(true, 0.0)
    total = shifted.sum(dim=1, keepdim=True)
    eps_y = 1.0 / (1.0 + beta * (v_ll - v_mc + gamma) / total)
    return torch.where(true, 1.0 - eps_y, eps_y * shifted / total)


def targeted_step(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    epsilon: float = 8 / 255,
    step_size: float = 8 / 255,
    steps: int = 1,
    start: bool = True,
) -> torch.Tensor:
    """Targeted signed descent on ``CE(f(x'), target)`` in the model's CURRENT mode.

    ``x0 = x + U(-eps, eps)`` (one default-generator draw, not clamped; ``start=False``: ``x``),
    then per step ``x' = clip01(proj_eps(x' - step * sign(grad CE)))`` with the CE summed over the
    batch. Only the input gradient is computed; the result is detached.
    """
    x = x.detach()
    with input_grad_mode():
        x_cur = random_start(x, epsilon, clamp=False) if start else x.clone()
        for _ in range(steps):
            x_cur = x_cur.detach().requires_grad_(True)
            logits = model(x_cur)
            loss = F.cross_entropy(logits.to(compute_dtype(logits.dtype)), target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_cur)
            x_cur = _clip(x_cur.detach() - step_size * grad.sign(), x, epsilon)
        return x_cur.detach()


@dataclass
class BilateralParams:
    """Bilateral adversarial training (official defaults: eps 8/255, step 8/255, ONE targeted step
    towards the most confusing class from a random start; adversarial labels with beta 9, gamma
    0.01). ``labels = "ls"`` uses plain label smoothing with factor ``smoothing`` instead (true
    class ``1 - smoothing``, the others ``smoothing / (K - 1)``)."""

    epsilon: float = 8 / 255
    step_size: float = 8 / 255
    steps: int = 1
    random_start: bool = True
    labels: Literal["la", "ls"] = "la"
    beta: float = 9.0
    gamma: float = 0.01
    smoothing: float = 0.5

    def __post_init__(self) -> None:
        _check_budget(self.epsilon, self.step_size, self.steps)
        if self.labels not in ("la", "ls"):
            raise ValueError(f"labels must be la or ls, got {self.labels!r}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")


class Bilateral:
    """The ``bilateral`` perturbation: ``(x_adv, targets)``.

    Eval mode: the clean logits without gradient; ``y_MC`` and the targets from them (before the
    random start); then :func:`targeted_step` towards ``y_MC``.
    """

    def __init__(self, params: BilateralParams) -> None:
        self.params = params

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Adversarial:
        p = self.params
        x = x.detach()
        with eval_mode(model):
            with torch.no_grad():
                clean = model(x)
            target = most_confusing(clean, y)
            if p.labels == "la":
                soft = adversarial_labels(clean, y, p.beta, p.gamma)
            else:
                soft = smoothed_targets(y, clean.shape[1], p.smoothing, dtype=compute_dtype(clean.dtype))
            x_adv = targeted_step(model, x, target, p.epsilon, p.step_size, p.steps, p.random_start)
        return Adversarial(x_adv, soft)

    def __repr__(self) -> str:
        return f"Bilateral({self.params})"


# --------------------------------------------------------------------------- TRADES


def kl_pgd(
    model: nn.Module,
    x: torch.Tensor,
    epsilon: float = 0.031,
    step_size: float = 0.007,
    steps: int = 10,
    start_std: float = 0.001,
) -> torch.Tensor:
    """TRADES's adversary in the model's CURRENT mode: ascend ``sum_i KL(p(x_i) || p(x'_i))``.

    ``p(x)`` without gradient; ``x0 = x + start_std * N(0, 1)`` (one ``randn_like`` draw from the
    default generator, neither clamped nor projected); per step
    ``x' = clip01(proj_eps(x' + step * sign(grad KL)))``. The result is detached.
    """
    x = x.detach()
    with input_grad_mode():
        with torch.no_grad():
            clean = model(x)
            p_clean = F.softmax(clean.to(compute_dtype(clean.dtype)), dim=1)
        x_cur = x + start_std * torch.randn_like(x, memory_format=torch.contiguous_format)
        for _ in range(steps):
            x_cur = x_cur.detach().requires_grad_(True)
            logits = model(x_cur)
            log_q = F.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=1)
            loss = F.kl_div(log_q, p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_cur)
            x_cur = _clip(x_cur.detach() + step_size * grad.sign(), x, epsilon)
        return x_cur.detach()


@dataclass
class TradesParams:
    """TRADES's KL-PGD (official CIFAR-10 defaults: eps 0.031, step 0.007, 10 steps, start
    ``x + 0.001 * N(0, 1)``). Train it with ``method.loss = "trades"`` (weight ``method.beta``)."""

    epsilon: float = 0.031
    step_size: float = 0.007
    steps: int = 10
    start_std: float = 0.001

    def __post_init__(self) -> None:
        _check_budget(self.epsilon, self.step_size, self.steps)
        if not (self.start_std >= 0 and math.isfinite(self.start_std)):
            raise ValueError(f"start_std must be >= 0, got {self.start_std}")


class Trades:
    """The ``trades`` perturbation: :func:`kl_pgd` in eval mode."""

    def __init__(self, params: TradesParams) -> None:
        self.params = params

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        p = self.params
        with eval_mode(model):
            return kl_pgd(model, x, p.epsilon, p.step_size, p.steps, p.start_std)

    def __repr__(self) -> str:
        return f"Trades({self.params})"
