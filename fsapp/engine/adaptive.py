"""The ``adaptive`` escalation: what a careful reviewer runs after AutoAttack, chosen by the flags
that fired and by what the model declares about itself.

The suite ``adaptive`` is ``autoattack`` followed by the attack ``adaptive``, which the evaluator
runs last, on the points every attack before it left robust (so everything lands in the per-sample
worst case). :func:`escalations` picks its stages:

==================  ==============================================================================
escalation          when
==================  ==============================================================================
``bpda``            the model declares ``input_transform`` (a module its forward applies first),
                    or flag ``zero-gradient`` fired: APGD-CE and APGD-DLR whose gradients go
                    through ``input_transform_approx`` (identity unless declared) while every
                    score comes from the real forward (straight-through BPDA)
``eot``             the model declares ``randomized = True``, or flag ``random-forward`` fired:
                    APGD-CE and APGD-DLR on the mean logits of ``eot_samples`` forwards
``transfer``        a source model was given (``--source``), or a gradient-masking flag fired
                    (``zero-gradient``, ``black-box-beats-white-box``, ``ce-margin-gap``,
                    ``single-step-beats-iterative``, ``random-forward``): APGD-CE and APGD-DLR
                    crafted on the source, or else on a surrogate of the same architecture that
                    fsapp trains itself (standard training, on the evaluated points) and says so
``square-heavy``    a score-based attack (a Square stage) removed points the white-box attacks
                    left, or flag ``black-box-beats-white-box`` fired: Square with
                    ``square_queries`` queries and ``square_restarts`` restarts
==================  ==============================================================================

A healthy model fires none of them: ``adaptive`` then adds nothing and costs nothing.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fsapp.adversary import Attack, cascade, eval_mode, predict
from fsapp.builtins.autoattack.apgd import apgd
from fsapp.builtins.autoattack.common import check_common
from fsapp.builtins.autoattack.square import square_linf

MASKING_FLAGS = ("zero-gradient", "black-box-beats-white-box", "ce-margin-gap", "single-step-beats-iterative",
                 "random-forward")
"""Flags that say the white-box gradients may be masked: each one triggers a transfer attack."""


@dataclass
class AdaptiveParams:
    """The escalations after AutoAttack (see :mod:`fsapp.engine.adaptive`) and their budgets."""

    eps: float = 8 / 255
    steps: int = 100
    eot_samples: int = 20
    square_queries: int = 10000
    square_restarts: int = 2
    surrogate_steps: int = 300
    seed: int | None = None

    def __post_init__(self) -> None:
        check_common(self.eps, self.square_restarts)
        for name in ("steps", "eot_samples", "square_queries", "surrogate_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Adaptive(Attack):
    """``adaptive``: run by the evaluator after the other attacks (its stages depend on them).

    Called directly (outside the evaluator) it escalates on what the model declares only.
    """

    access = "adaptive"
    loss = "mixed"
    adaptive = True

    def __init__(self, p: AdaptiveParams) -> None:
        self.p = p
        self.eps = p.eps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with eval_mode(model):
            stages = [(e.name, e.attack) for e in escalations(self.p, model, None, [], False, x, y)]
            return cascade(model, x, y, stages)[0]


@dataclass
class Escalation:
    """One escalation: its name, why it runs, and the attack (it ignores the model it is handed)."""

    name: str
    reason: str
    attack: Callable[[nn.Module, Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- model wrappers


class _StraightThrough(nn.Module):
    """Value of ``transform(x)``, gradient of ``approx(x)`` (BPDA)."""

    def __init__(self, transform: nn.Module, approx: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.approx = approx

    def forward(self, x: Tensor) -> Tensor:
        smooth = self.approx(x)
        with torch.no_grad():
            exact = self.transform(x)
        return smooth + (exact - smooth).detach()


class BPDA(nn.Module):
    """The model with its declared ``input_transform`` swapped for the straight-through version."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with _swapped_transform(self.model):
            return self.model(x)


@contextlib.contextmanager
def _swapped_transform(model: nn.Module) -> Iterator[None]:
    transform = model.input_transform
    approx = getattr(model, "input_transform_approx", None) or nn.Identity()
    model.input_transform = _StraightThrough(transform, approx)
    try:
        yield
    finally:
        model.input_transform = transform


class EOT(nn.Module):
    """Expectation over transformation: the mean logits of ``samples`` forwards."""

    def __init__(self, model: nn.Module, samples: int) -> None:
        super().__init__()
        self.model = model
        self.samples = samples

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.model(x) for _ in range(self.samples)]).mean(0)


def declares_transform(model: nn.Module) -> bool:
    """Whether ``model`` declares a non-differentiable input preprocessing (``input_transform``)."""
    return isinstance(getattr(model, "input_transform", None), nn.Module)


def _adapted(model: nn.Module, p: AdaptiveParams, randomized: bool) -> nn.Module:
    net: nn.Module = BPDA(model) if declares_transform(model) else model
    return EOT(net, p.eot_samples) if randomized else net


def _apgd_pair(net: nn.Module, judge: nn.Module, p: AdaptiveParams) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """APGD-CE, then APGD-DLR on the points ``judge`` (the evaluated model) still classifies
    correctly, both crafting on ``net``."""

    def attack(_model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        stages = [("ce", lambda m, xs, ys: apgd(m, xs, ys, p.eps, p.steps, 1, "ce", seed=p.seed)),
                  ("dlr", lambda m, xs, ys: apgd(m, xs, ys, p.eps, p.steps, 1, "dlr", seed=p.seed, strict=False))]
        robust = torch.ones(len(y), dtype=torch.bool, device=y.device)
        with eval_mode(judge):
            return cascade(net, x, y, stages, robust=robust, labels=lambda xs: predict(judge, xs))[0]

    return attack


# --------------------------------------------------------------------------- the surrogate


def train_surrogate(model: nn.Module, x: Tensor, y: Tensor, steps: int, seed: int = 0) -> nn.Module:
    """A standard-trained model of ``model``'s architecture: a copy with every parameter re-initialised,
    trained with cross-entropy (Adam, full batch) on ``(x, y)`` for ``steps`` steps."""
    surrogate = copy.deepcopy(model)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in surrogate.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        for module in surrogate.modules():  # running statistics start afresh with the weights
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
        opt = torch.optim.Adam(surrogate.parameters(), lr=1e-2)
        surrogate.train()
        net = BPDA(surrogate) if declares_transform(surrogate) else surrogate
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.random.set_rng_state(gen_state)
    return surrogate.eval()


# --------------------------------------------------------------------------- choosing


def escalations(p: AdaptiveParams, model: nn.Module, source: nn.Module | None, fired: list[str],
                square_helped: bool, x: Tensor, y: Tensor) -> list[Escalation]:
    """The escalations for ``model`` given the flag ids that ``fired``, a ``source`` model (or None),
    whether a score-based stage removed points the white-box ones left (``square_helped``), and the
    evaluated points (a surrogate is trained on them when one is needed and none was given)."""
    out: list[Escalation] = []
    randomized = bool(getattr(model, "randomized", False)) or "random-forward" in fired
    if declares_transform(model) or "zero-gradient" in fired:
        why = ("the model declares input_transform" if declares_transform(model)
               else "flag zero-gradient fired (no declared input_transform: the approximation is the model itself)")
        out.append(Escalation("bpda", why, _apgd_pair(_adapted(model, p, False), model, p)))
    if randomized:
        why = "the model declares randomized" if getattr(model, "randomized", False) else "flag random-forward fired"
        out.append(Escalation("eot", f"{why}; mean over {p.eot_samples} forwards",
                              _apgd_pair(_adapted(model, p, True), model, p)))
    masking = [f for f in MASKING_FLAGS if f in fired]
    if source is not None:
        out.append(Escalation("transfer", "crafted on the given source model",
                              _apgd_pair(_adapted(source, p, False), model, p)))
    elif masking:
        surrogate = train_surrogate(model, x, y, p.surrogate_steps, p.seed or 0)
        out.append(Escalation(
            "transfer", f"flag {masking[0]} fired; no source given, so fsapp trained a surrogate of the same "
                        f"architecture (standard training, {p.surrogate_steps} steps on the {len(y)} evaluated "
                        "points)", _apgd_pair(_adapted(surrogate, p, randomized), model, p)))
    if square_helped or "black-box-beats-white-box" in fired:
        why = "a score-based stage beat the white-box ones" if square_helped else "flag black-box-beats-white-box fired"
        q, r = p.square_queries, p.square_restarts

        def heavy(_model: nn.Module, xs: Tensor, ys: Tensor) -> Tensor:
            return square_linf(model, xs, ys, p.eps, q, 0.8, r, False, p.seed)

        out.append(Escalation("square-heavy", f"{why}; {q} queries, {r} restarts", heavy))
    return out


def square_helped(runs: list[Any]) -> bool:
    """Whether a score-based stage of an earlier staged attack removed points (per the stage masks)."""
    for run in runs:
        previous = None
        for name, mask in run.stages.items():
            if previous is not None and run.stage_access.get(name) in ("score", "decision") \
                    and bool((previous & ~mask).any()):
                return True
            previous = mask
    return False
