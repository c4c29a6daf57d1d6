"""The adversary vocabulary shared by attacks, perturbations, the evaluator and the training guard.

- :func:`eval_mode` / :func:`input_grad_mode`: how an adversary runs the model (eval mode, every
  module's own flag restored; autograd on even under ``no_grad``/``inference_mode``).
- :func:`preserved_state`: modes AND buffers (BatchNorm running statistics, counters) saved and
  restored around third-party code, so an adversary cannot change the model it attacks.
- :func:`random_start`: the uniform start in the L-inf ball, one ``empty_like(x).uniform_`` draw.
- :class:`ThreatModel`: a norm ball that can say what it ``contains`` and ``project`` into it.
- :class:`Attack` and :func:`cascade`: the attack contract (threat declared as class attributes,
  optional ``stages``) and the staged run on the points still robust (per-sample worst case).
- :func:`predict`: eval-mode labels where a non-finite output row is never a class (label -1).

The contract a plugin author implements is documented in :mod:`fsapp.hookspecs`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from fsapp.registry import declared_norm

BALL_TOLERANCE = 1e-6
"""How far outside its ball an example may lie before it counts as invalid (float rounding)."""

NORMS = ("Linf", "L2", "L1")

AttackFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- how the model runs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore every module's own ``training`` flag on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def input_grad_mode() -> Iterator[None]:
    """Enable autograd even under ``torch.no_grad()`` or ``torch.inference_mode()``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def preserved_state(*models: nn.Module | None) -> Iterator[None]:
    """Run code that may switch modes or write buffers (a third-party attack that calls
    ``model.train()`` and forwards); on exit every module's mode and every buffer (BatchNorm
    running statistics, ``num_batches_tracked``) is what it was, also after an exception.

    Buffers are copied back on the device without a host synchronisation.
    """
    modes: list[tuple[nn.Module, bool]] = []
    buffers: list[tuple[nn.Module, str, Tensor, Tensor]] = []
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            modes.append((module, module.training))
            for name, buf in module._buffers.items():
                if buf is not None:
                    buffers.append((module, name, buf, buf.detach().clone()))
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for module, name, buf, saved in buffers:
            module._buffers[name] = buf  # a buffer replaced by another tensor is put back
            with torch.inference_mode(buf.is_inference()), torch.no_grad():
                buf.copy_(saved)


def random_start(x: Tensor, eps: float, clamp: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """``x + U(-eps, eps)``: ONE ``empty_like(x).uniform_`` draw (from the default generator unless
    ``generator`` is given).

    The noise is drawn in the contiguous (NCHW) layout, so a channels-last ``x`` gets the same
    values at the same pixels as a contiguous one.
    """
    noise = torch.empty_like(x, memory_format=torch.contiguous_format).uniform_(-eps, eps, generator=generator)
    x0 = x + noise
    return x0.clamp(0.0, 1.0) if clamp else x0


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int | None = None) -> Tensor:
    """Eval-mode predicted labels of ``x`` (model modes restored); a row of logits that is not
    all finite predicts no class (label -1), so it never counts as correct."""
    with eval_mode(model):
        if len(x) == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        size = batch_size or len(x)
        labels = []
        for start in range(0, len(x), size):
            logits = model(x[start:start + size])
            finite = torch.isfinite(logits).all(1)
            labels.append(torch.where(finite, logits.argmax(1), torch.full_like(finite, -1, dtype=torch.long)))
        return torch.cat(labels)


# --------------------------------------------------------------------------- threat models


@dataclass(frozen=True)
class ThreatModel:
    """A norm ball: ``norm`` "Linf", "L2" or "L1" ("unbounded" or None: undeclared), ``eps`` None =
    unbounded. Inputs live in [0, 1]; any other norm name is treated as Linf when projecting."""

    norm: str | None = "Linf"
    eps: float | None = None

    def within(self, other: "ThreatModel | None") -> bool:
        """Whether every point allowed by ``self`` is allowed by ``other``."""
        if other is None:
            return True
        if self.norm != other.norm or self.eps is None:
            return False
        return other.eps is None or self.eps <= other.eps + 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps}

    def __str__(self) -> str:
        norm = self.norm or "?"
        return f"{norm} unbounded" if self.eps is None else f"{norm} eps {self.eps:.4g}"

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-sample size of ``x_adv - x`` in this ball's norm."""
        delta = (x_adv - x).flatten(1)
        if self.norm == "L2":
            return delta.norm(dim=1)
        if self.norm == "L1":
            return delta.abs().sum(1)
        return delta.abs().amax(1)

    def contains(self, x_adv: Tensor, x: Tensor, tol: float = BALL_TOLERANCE) -> Tensor:
        """Per sample: finite, inside the ball around ``x`` (plus ``tol``) and inside [0, 1]."""
        finite = torch.isfinite(x_adv).flatten(1).all(1)
        ok = finite & ~((x_adv < 0) | (x_adv > 1)).flatten(1).any(1)
        if self.eps is not None:
            safe = torch.where(torch.isfinite(x_adv), x_adv, x)
            ok &= self.distance(safe, x) <= self.eps + tol
        return ok

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """The nearest point of the ball inside [0, 1]; non-finite entries fall back to ``x``. An L-inf
        point already inside is returned unchanged, bit for bit (clipping is exact)."""
        x_adv = torch.where(torch.isfinite(x_adv), x_adv, x)
        eps = self.eps
        if eps is not None:
            if self.norm in ("L2", "L1"):
                delta = (x_adv - x).flatten(1)
                norms = self.distance(x_adv, x)
                scale = torch.clamp(eps / norms.clamp_min(1e-12), max=1.0)
                x_adv = x + (delta * scale[:, None]).view_as(x)
            else:
                x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
        return x_adv.clamp(0, 1)

    def project_step(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """The L-inf projection as projected-gradient steps write it (the reference arithmetic of PGD
        and of the Feature Scattering step): ``clamp(x + clamp(x_adv - x, -eps, eps), 0, 1)``."""
        if self.eps is None:
            return torch.clamp(x_adv, min=0.0, max=1.0)
        eps = self.eps
        return torch.clamp(x + torch.clamp(x_adv - x, min=-eps, max=eps), min=0.0, max=1.0)


def linf(eps: float | None) -> ThreatModel:
    """The L-inf ball of radius ``eps`` (None: unbounded)."""
    return ThreatModel("Linf", eps)


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def threat_of(attack: Any, params_cls: type, params: dict[str, Any]) -> ThreatModel:
    """An attack's threat model from its ``norm``/``eps`` attributes or its parameters."""
    norm = declared_norm(attack) or declared_norm(params_cls) or (
        params["norm"] if isinstance(params.get("norm"), str) else None)
    eps = _number(getattr(attack, "eps", None))
    if eps is None:
        eps = _number(params.get("eps"))
    if norm is None and "eps" in params:
        norm = "Linf"
    if norm is None and eps is None:
        norm = "unbounded"
    return ThreatModel(norm, eps)


_BUILTIN_KIND = {"fgsm": ("gradient", "ce"), "pgd": ("gradient", "ce"), "cw": ("gradient", "margin")}


def kind_of(attack: Any, name: str) -> tuple[str, str | None]:
    """``(access, loss)`` of an attack: its attributes, else what is known of the built-ins."""
    access, loss = _BUILTIN_KIND.get(name, ("gradient", None))
    a = getattr(attack, "access", None)
    b = getattr(attack, "loss", None)
    return (a if isinstance(a, str) else access), (b if isinstance(b, str) else loss)


# --------------------------------------------------------------------------- attacks


def cascade(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    stages: Sequence[tuple[str, AttackFn]],
    *,
    robust: Tensor | None = None,
    labels: Callable[[Tensor], Tensor] | None = None,
    on_stage: Callable[[str, Tensor], Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``stages`` in order, each on the points the previous ones left robust.

    A point fooled by a stage keeps that stage's example (per-sample worst case over the stages).
    ``robust`` is the starting mask (default: the points ``model`` classifies correctly);
    ``labels(x_adv)`` decides what is fooled (default: :func:`predict` with ``model``; the evaluator
    passes the evaluated model when the examples are crafted on another); ``on_stage(name, robust)``
    sees the mask after every stage, also a stage that had no point left. Returns
    ``(x_adv, robust)``.
    """
    label = labels if labels is not None else (lambda xs: predict(model, xs))
    adv = x.detach().clone()
    robust = (label(x) == y) if robust is None else robust.clone()
    for name, stage in stages:
        idx = robust.nonzero().flatten()
        if idx.numel():
            out = stage(model, x[idx], y[idx])
            fooled = label(out) != y[idx]
            adv[idx[fooled]] = out[fooled].to(adv.dtype)
            robust[idx[fooled]] = False
        if on_stage is not None:
            on_stage(name, robust)
    return adv, robust


class Attack:
    """Base class of an evaluation attack: ``attack(model, x, y) -> x_adv``.

    The threat and kind are class (or instance) attributes the evaluator reads:
    ``norm`` ("Linf", "L2", "L1"), ``eps`` (None: unbounded), ``access`` ("gradient", "score",
    "decision"), ``loss`` ("ce", "margin", ...) and ``stages``: a list of ``(name, attack)`` run by
    :func:`cascade`, each on the points the previous ones left robust. A subclass either defines
    ``stages`` (and inherits ``__call__``) or overrides ``__call__``.
    """

    norm: str | None = "Linf"
    eps: float | None = None
    access: str = "gradient"
    loss: str | None = "ce"
    stages: Sequence[tuple[str, AttackFn]] = ()

    @property
    def threat(self) -> ThreatModel:
        """The ball this attack's examples must stay in."""
        return ThreatModel(self.norm, self.eps)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if not self.stages:
            raise TypeError(f"{type(self).__name__} must define stages or override __call__")
        with eval_mode(model):
            return cascade(model, x, y, self.stages)[0]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"
