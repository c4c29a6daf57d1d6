"""Training-time perturbations: ``perturb(model, x, y) -> x_adv`` or ``(x_adv, targets)``.

The second form carries soft labels for the outer loss (the contract of :mod:`fsapp.method`);
``bilateral`` uses it. ``bilateral`` and ``trades`` live in :mod:`fsapp.builtins.methods` and are
registered here with the others.

Every perturbation puts the model in eval mode and restores each module's mode afterwards (also
on exceptions), differentiates with respect to the input only (parameters' ``.grad`` are never
touched), and returns ``x_adv`` detached, inside the L-inf eps-ball around ``x`` and in [0, 1].
The shared vocabulary (``eval_mode``, ``input_grad_mode``, ``random_start``, the L-inf
:class:`~fsapp.adversary.ThreatModel`) lives in :mod:`fsapp.adversary`; the first three are
importable from here too.

``feature-scatter`` is the lean form of the reference step (docs/ALGORITHM.md): one clean forward
without gradient, one random start drawn as a single ``torch.empty_like(x).uniform_(-eps, eps)``
from the default generator, then per step one forward/backward w.r.t. the input of the feature
scattering loss ``sum(T * C)`` with the plan ``T`` of the configured solver.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from fsapp.adversary import eval_mode, input_grad_mode, linf, random_start
from fsapp.builtins.methods import Bilateral, BilateralParams, Trades, TradesParams
from fsapp.hookspecs import hookimpl
from fsapp.losses import cost_matrix
from fsapp.registry import NoParams

Solver = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "FeatureScatter",
    "FeatureScatterParams",
    "attack_layout",
    "RandomParams",
    "SupervisedParams",
    "eval_mode",
    "feature_scatter_step",
    "input_grad_mode",
    "random_start",
    "scatter_loss",
    "supervised_pgd",
]


# --------------------------------------------------------------------------- parameters


def _check_ball(name: str, epsilon: float, step_size: float, steps: int) -> None:
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"{name} must be >= 0, got {epsilon}")
    if not (step_size >= 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


# --------------------------------------------------------------------------- feature scattering


def scatter_loss(z_clean: torch.Tensor, z_adv: torch.Tensor, solver: Solver) -> torch.Tensor:
    """The feature scattering loss ``D = sum(T * C)`` with ``C = cost_matrix(z_clean, z_adv)``.

    ``C`` is float32 (float64 for float64 inputs); ``T = solver(C)`` may keep its graph. Autocast
    is switched off here, so under ``run.precision`` bf16/fp16 the cost matrix and the solver's
    iterations still run in float32 (autocast would otherwise turn the cost's matmul into bf16).
    """
    with torch.autocast(z_adv.device.type, enabled=False):
        C = cost_matrix(z_clean, z_adv)
        T = solver(C)
        return (T * C).sum()


def feature_scatter_step(
    model: nn.Module,
    x: torch.Tensor,
    solver: Solver,
    epsilon: float = 8 / 255,
    step_size: float = 8 / 255,
    steps: int = 1,
    clamp_start: bool = False,
) -> torch.Tensor:
    """Feature scattering adversary in the model's CURRENT mode (callers use :func:`eval_mode`).

    ``z = f(x)`` without gradient; ``x0 = x + U(-eps, eps)`` (one default-generator draw, not
    clamped unless ``clamp_start``); per step ``g = d sum(T*C) / d x_cur`` and
    ``x_next = clamp(x + clamp(x_cur + step * sign(g) - x, -eps, eps), 0, 1)``. Only the input
    gradient is computed; the result is detached.
    """
    x = x.detach()
    ball = linf(epsilon)
    with input_grad_mode():
        with torch.no_grad():
            z_clean = model(x)
        x_cur = random_start(x, epsilon, clamp=clamp_start)
        for _ in range(steps):
            x_cur = x_cur.detach().requires_grad_(True)
            loss = scatter_loss(z_clean, model(x_cur), solver)
            (grad,) = torch.autograd.grad(loss, x_cur)
            # A non-finite cost or plan poisons the batch (x + NaN) instead of silently giving a
            # zero step (sign(NaN) is 0), so the training loop sees a non-finite loss and skips it.
            # For a finite loss this adds exactly 0 and costs no host sync.
            poison = loss.detach() - loss.detach()
            x_cur = ball.project_step(x_cur.detach() + step_size * grad.sign(), x) + poison
        return ball.project_step(x_cur.detach(), x)


@dataclass
class FeatureScatterParams:
    """Feature scattering (paper defaults: eps 8/255, step 8/255, 1 step, faithful Sinkhorn).

    ``solver`` is a solver spec; inside a spec string separate the solver's own parameters with
    ``;`` (``feature-scatter:solver=sinkhorn:mode=converged;max_iter=500``). ``layout`` is the
    memory layout of the attack passes: ``auto`` runs them channels-last for float32/bfloat16
    batches on the CPU (oneDNN's input gradient of a strided convolution is 2-3x slower in NCHW
    there) and keeps the input's layout elsewhere; ``keep`` never converts. The result comes
    back in the input's layout; only rounding differs between layouts.
    """

    epsilon: float = 8 / 255
    step_size: float = 8 / 255
    steps: int = 1
    solver: str = "sinkhorn"
    clamp_start: bool = False
    layout: Literal["auto", "keep", "channels-last"] = "auto"

    def __post_init__(self) -> None:
        _check_ball("epsilon", self.epsilon, self.step_size, self.steps)
        if not self.solver.strip():
            raise ValueError("solver must be a solver spec like 'sinkhorn' or 'ipot:iters=50'")
        if self.layout not in ("auto", "keep", "channels-last"):
            raise ValueError(f"layout must be auto, keep or channels-last, got {self.layout!r}")


def attack_layout(x: torch.Tensor, layout: str = "auto") -> torch.Tensor:
    """``x`` in the memory layout the attack passes run in (see :class:`FeatureScatterParams`)."""
    if x.dim() != 4 or layout == "keep":
        return x
    if layout == "auto" and not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)):
        return x
    return x.contiguous(memory_format=torch.channels_last)


class FeatureScatter:
    """The ``feature-scatter`` perturbation; ``solver`` is any ``cost -> plan`` callable."""

    def __init__(self, params: FeatureScatterParams, solver: Solver) -> None:
        self.params = params
        self.solver = solver

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        p = self.params
        x_in = attack_layout(x, p.layout)
        with eval_mode(model):
            x_adv = feature_scatter_step(
                model, x_in, self.solver, p.epsilon, p.step_size, p.steps, p.clamp_start
            )
        return x_adv if x_in is x else torch.empty_like(x).copy_(x_adv)

    def __repr__(self) -> str:
        return f"FeatureScatter({self.params}, solver={self.solver!r})"


def _make_feature_scatter(params: FeatureScatterParams) -> FeatureScatter:
    from fsapp.plugins import get_registry

    return FeatureScatter(params, get_registry().create("solver", params.solver.replace(";", ",")))


# --------------------------------------------------------------------------- baselines


def supervised_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 7,
    start: bool = True,
) -> torch.Tensor:
    """PGD on the cross-entropy with the true labels (Madry et al.), in the model's current mode."""
    x = x.detach()
    y = y.detach()
    ball = linf(epsilon)
    with input_grad_mode():
        x_cur = random_start(x, epsilon) if start else x.clone()
        for _ in range(steps):
            x_cur = x_cur.detach().requires_grad_(True)
            logits = model(x_cur)
            loss = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, y)
            (grad,) = torch.autograd.grad(loss, x_cur)
            x_cur = ball.project_step(x_cur.detach() + step_size * grad.sign(), x)
        return x_cur.detach()


@dataclass
class SupervisedParams:
    """PGD-k on cross-entropy with true labels (Madry: eps 8/255, step 2/255, 7 steps)."""

    epsilon: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 7
    random_start: bool = True

    def __post_init__(self) -> None:
        _check_ball("epsilon", self.epsilon, self.step_size, self.steps)


class Supervised:
    """The ``supervised`` perturbation."""

    def __init__(self, params: SupervisedParams) -> None:
        self.params = params

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.params
        with eval_mode(model):
            return supervised_pgd(model, x, y, p.epsilon, p.step_size, p.steps, p.random_start)

    def __repr__(self) -> str:
        return f"Supervised({self.params})"


@dataclass
class RandomParams:
    """Uniform noise in the eps-ball, no gradient."""

    epsilon: float = 8 / 255

    def __post_init__(self) -> None:
        if not (self.epsilon >= 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")


class RandomNoise:
    """The ``random`` perturbation: ``clamp(x + U(-eps, eps), 0, 1)``."""

    def __init__(self, params: RandomParams) -> None:
        self.params = params

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            return random_start(x.detach(), self.params.epsilon).detach()

    def __repr__(self) -> str:
        return f"RandomNoise({self.params})"


def _no_perturbation(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``none`` perturbation: clean training."""
    return x.detach()


@hookimpl
def register_perturbations(register) -> None:  # noqa: ANN001 - the hook's register callback
    """Register the built-in training-time perturbations."""

    register(
        "feature-scatter",
        _make_feature_scatter,
        params=FeatureScatterParams,
        description="feature scattering: ascend the OT distance between clean and perturbed "
        "logits (Zhang & Wang 2019)",
    )
    register(
        "supervised",
        Supervised,
        params=SupervisedParams,
        description="PGD on cross-entropy with the true labels (Madry et al. 2018)",
    )
    register(
        "bilateral",
        Bilateral,
        params=BilateralParams,
        description="one targeted step towards the most confusing class, with adversarial labels "
        "(Wang & Zhang 2019)",
    )
    register(
        "trades",
        Trades,
        params=TradesParams,
        description="KL-PGD of TRADES (Zhang et al. 2019); train with method.loss=trades",
    )
    register(
        "random", RandomNoise, params=RandomParams, description="uniform noise in the eps-ball"
    )
    register(
        "none", lambda params: _no_perturbation, params=NoParams, description="no perturbation"
    )
