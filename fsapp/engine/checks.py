"""What the evaluator checks before a number counts: the examples an attack returns and the model.

- :func:`check_examples`: an attack's examples against the threat model, measured from the
  evaluator's PRIVATE copy of the clean input (an attack that edits its input in place cannot
  move the centre of its own ball); invalid ones are projected back and counted.
- :func:`validate_output`: the attack returned a tensor of the input's shape (else one line naming
  the attack and its plugin).
- :func:`model_checks`: counts behind the model flags of :mod:`fsapp.engine.flags`, on the clean
  data: random forward passes, probability outputs, zero input gradients, non-finite outputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fsapp.adversary import ThreatModel
from fsapp.errors import PluginError

CHECK_NAMES = ("random_forward", "probability_rows", "zero_gradient", "checked", "checked_correct")
"""The model-check counts of a report's ``checks``, in the order they are summed over ranks."""


def validate_output(x_adv: Any, like: Tensor, what: str) -> Tensor:
    """``x_adv`` detached, on ``like``'s device and dtype; anything but a tensor of ``like``'s shape is
    a :class:`PluginError` naming ``what`` (e.g. "attack 'x' from plugin 'y'")."""
    if not isinstance(x_adv, Tensor) or x_adv.shape != like.shape:
        got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
        raise PluginError(f"{what} returned {got}, expected a tensor of shape {tuple(like.shape)}")
    if x_adv.is_complex():
        raise PluginError(f"{what} returned a complex tensor, expected real values in [0, 1]")
    try:
        return x_adv.detach().to(device=like.device, dtype=like.dtype)
    except (RuntimeError, NotImplementedError) as exc:
        raise PluginError(f"{what} returned a tensor on {x_adv.device} that cannot be moved to {like.device}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def check_examples(x: Tensor, x_adv: Tensor, threat: ThreatModel) -> tuple[Tensor, int]:
    """Force examples into ``threat`` around ``x`` and into [0, 1]; return them and how many were
    invalid (outside the ball plus 1e-6, outside [0, 1], or not finite). ``x`` must be a copy the
    attack never saw."""
    valid = threat.contains(x_adv, x)
    return threat.project(x_adv, x), int((~valid).sum())


def model_checks(model: torch.nn.Module, x: Tensor, y: Tensor, clean: Tensor, logits: Tensor) -> dict[str, int]:
    """Counts behind the model flags, on one batch: random forward, probability rows, zero gradients."""
    with torch.no_grad():
        again = model(x).float()
    first = logits.float()
    finite = torch.isfinite(first).all(1) & torch.isfinite(again).all(1)
    differ = ((first - again).abs() > 1e-5 + 1e-4 * first.abs()).any(1) & finite
    in_unit = ((first >= -1e-6) & (first <= 1 + 1e-6)).all(1)
    prob_rows = in_unit & ((first.sum(1) - 1).abs() < 1e-3)
    zero = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    if bool(clean.any()):
        idx = clean.nonzero().flatten()
        xs = x[idx].detach().clone().requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            out = model(xs)
            grad = None
            if out.requires_grad:
                loss = F.cross_entropy(out.float(), y[idx], reduction="sum")
                grad = torch.autograd.grad(loss, xs, allow_unused=True)[0]
        flat = grad.flatten(1).abs().sum(1) if grad is not None else torch.zeros(len(idx), device=x.device)
        zero[idx] = ~(flat > 0)
    return {"random_forward": int(differ.sum()), "probability_rows": int(prob_rows.sum()),
            "zero_gradient": int(zero.sum()), "checked": len(x), "checked_correct": int(clean.sum())}
