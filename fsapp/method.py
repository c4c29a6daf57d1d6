"""The training-method contract: what a training-time perturbation hands to the outer loss.

A training *method* is a perturbation plus the targets and the outer loss the model is updated
with. A perturbation ``perturb(model, x, y)`` returns either

- a tensor ``x_adv`` (Feature Scattering, Madry's PGD, TRADES's KL-PGD): the outer loss builds
  its targets from the labels ``y`` (``method.loss`` and ``method.label_smoothing``), or
- an :class:`Adversarial` ``(x_adv, targets)`` (any 2-tuple reads the same), where ``targets`` is a
  float ``[B, K]`` tensor of soft labels, one probability row per example (Bilateral's adversarial
  labels). They replace the labels in the outer loss: every outer loss is then the soft-label
  cross-entropy against ``targets`` on the branch that uses labels (see
  :class:`fsapp.losses.OuterLoss`), and ``method.label_smoothing`` is not used.

The outer loss (``method.loss``) then runs the train-mode forwards it needs: ``soft-ce`` and
``ce`` one forward on ``x_adv``; ``trades`` one on the clean ``x`` and one on ``x_adv``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["Adversarial", "as_adversarial"]


class Adversarial(NamedTuple):
    """A perturbed batch: ``x`` the adversarial inputs (detached, in the eps-ball and [0, 1]) and
    ``targets`` the soft labels ``[B, K]`` for the outer loss (None: built from the labels)."""

    x: Tensor
    targets: Tensor | None = None


def as_adversarial(out: Any) -> Adversarial:
    """A perturbation's result as an :class:`Adversarial`: a tensor is ``x_adv`` without targets, a
    2-tuple is ``(x_adv, targets)``; anything else is returned unchecked in ``x`` (the guard and the
    model report it)."""
    if isinstance(out, Adversarial):
        return out
    if isinstance(out, tuple) and len(out) == 2:
        return Adversarial(out[0], out[1])
    return Adversarial(out, None)
