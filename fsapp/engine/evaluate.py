"""Robustness evaluation: clean accuracy, each attack, and the per-sample worst case.

Every adversarial example is checked before it counts (inside the eps-ball plus 1e-6, inside
[0, 1], finite) and accuracy is recomputed with a fresh eval-mode forward on the returned
examples. A sample is robust only if no attack found a misclassified point for it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from fsapp.registry import make_params, parse_spec

BALL_TOLERANCE = 1e-6


@dataclass
class AttackRun:
    """One attack's settings, per-sample robustness and cost."""

    spec: str
    name: str
    params: dict[str, Any]
    robust: Tensor
    seconds: float
    invalid: int = 0


@dataclass
class Report:
    """An evaluation report; ``accuracy`` maps "clean", each spec as given, and "worst_case"."""

    n: int
    accuracy: dict[str, float]
    clean: Tensor
    worst_case: Tensor
    attacks: list[AttackRun] = field(default_factory=list)
    flags: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def gap(self) -> float | None:
        """Cross-entropy PGD accuracy minus margin-loss (CW) accuracy, when both ran."""
        ce = [r for r in self.attacks if r.name == "pgd"]
        margin = [r for r in self.attacks if r.name == "cw"]
        if not ce or not margin:
            return None
        return min(self.accuracy[r.spec] for r in ce) - min(self.accuracy[r.spec] for r in margin)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": dict(self.accuracy),
            "gap_ce_minus_margin": self.gap,
            "attacks": [
                {"spec": r.spec, "name": r.name, "params": r.params, "accuracy": self.accuracy[r.spec],
                 "seconds": r.seconds, "invalid_examples": r.invalid}
                for r in self.attacks
            ],
            "flags": list(self.flags),
            "seconds": self.seconds,
        }


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@torch.no_grad()
def predict(model: torch.nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Eval-mode predicted labels of ``x``, batch by batch (model mode restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[s]).argmax(1) for s in _batches(len(x), batch_size)])
    finally:
        model.train(was_training)


def _check_examples(x: Tensor, x_adv: Tensor, eps: float | None) -> tuple[Tensor, int]:
    """Force examples into the threat model; return them and how many were invalid."""
    finite = torch.isfinite(x_adv).flatten(1).all(1)
    x_adv = torch.where(torch.isfinite(x_adv), x_adv, x)
    bad = ~finite
    if eps is not None:
        outside = (x_adv - x).abs().flatten(1).amax(1) > eps + BALL_TOLERANCE
        bad |= outside
        x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
    out_of_range = ((x_adv < 0) | (x_adv > 1)).flatten(1).any(1)
    bad |= out_of_range
    x_adv = x_adv.clamp(0, 1)
    return x_adv, int(bad.sum())


def build_attack(spec: str) -> tuple[Callable[..., Tensor], str, dict[str, Any]]:
    """Build an attack from its spec; returns ``(attack, name, resolved params)``."""
    from fsapp.plugins import get_registry

    parsed = parse_spec(spec)
    component = get_registry().get("attack", parsed.name)
    params = make_params(component, parsed.params)
    return component.factory(params), parsed.name, dataclasses.asdict(params)


def evaluate(
    model: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: list[str],
    batch_size: int = 250,
    device: str | torch.device | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    defaults: dict[str, Any] | None = None,
) -> Report:
    """Evaluate ``model`` on (x, y) against ``attacks`` (spec strings); see :class:`Report`.

    ``defaults`` (e.g. ``{"eps": 8/255}``) fill parameters that a spec does not name; the
    report still keys each attack by its spec as given.
    """
    start = time.perf_counter()
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    x = x.to(device)
    y = y.to(device)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    n = len(y)
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, x, y, attacks, batch_size, on_progress, defaults, start)
    finally:
        model.train(was_training)


def _evaluate(model, x, y, attacks, batch_size, on_progress, defaults, start) -> Report:  # noqa: ANN001
    from fsapp.config import with_defaults
    from fsapp.engine.flags import compute_flags

    n = len(y)
    clean = predict(model, x, batch_size) == y
    worst = clean.clone()
    accuracy: dict[str, float] = {"clean": _frac(clean)}
    runs: list[AttackRun] = []
    for spec in attacks:
        attack, name, params = build_attack(with_defaults(spec, **defaults) if defaults else spec)
        t0 = time.perf_counter()
        robust = clean.clone()
        invalid = 0
        for i, s in enumerate(_batches(n, batch_size)):
            if on_progress is not None:
                on_progress(spec, s.start, n)
            x_adv = attack(model, x[s], y[s]).detach()
            x_adv, bad = _check_examples(x[s], x_adv, params.get("eps"))
            invalid += bad
            robust[s] &= predict(model, x_adv, batch_size) == y[s]
        if on_progress is not None:
            on_progress(spec, n, n)
        worst &= robust
        accuracy[spec] = _frac(robust)
        runs.append(AttackRun(spec, name, params, robust, time.perf_counter() - t0, invalid))
    accuracy["worst_case"] = _frac(worst)
    report = Report(n, accuracy, clean, worst, runs, seconds=time.perf_counter() - start)
    report.flags = compute_flags(report)
    return report


def _frac(mask: Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else 0.0
