"""Guards around third-party components: malformed results are caught and reported by plugin."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fsapp.adversary import linf, preserved_state
from fsapp.engine.checks import validate_output
from fsapp.errors import PluginError, UsageError
from fsapp.method import Adversarial, as_adversarial

Perturb = Callable[[torch.nn.Module, Tensor, Tensor], "Tensor | Adversarial | tuple[Tensor, Tensor]"]

TARGET_TOLERANCE = 1e-3
"""How far a row of soft labels may sum from 1."""


class GuardedPerturbation:
    """Wraps a plugin's perturbation for training.

    The plugin gets copies of ``x`` and ``y`` (an in-place edit cannot move the centre of its ball
    or the clean batch the loss sees) and runs with the model's modes and buffers saved and
    restored (it cannot change BatchNorm statistics of the model under training). Its output's
    type and shape are checked, and every example is forced into the eps-ball and [0, 1]
    (non-finite values fall back to the clean input). A perturbation may return
    ``(x_adv, targets)`` (:mod:`fsapp.method`): ``targets`` must be a real tensor ``[B, K]``
    (``K = num_classes`` when given), else the plugin is named in one line; a row that is not
    finite, has a negative entry or does not sum to 1 (within 1e-3) is replaced by the one-hot
    label and counted with the examples. Violations are counted on the device (no host sync) and
    read by the loop when it reports. An exception from the plugin is one line naming it.
    """

    def __init__(self, perturb: Perturb, epsilon: float | None, name: str, plugin: str,
                 num_classes: int | None = None) -> None:
        self.perturb = perturb
        self.ball = linf(epsilon)
        self.name = name
        self.plugin = plugin
        self.num_classes = num_classes
        self.violations: Tensor | None = None

    @property
    def what(self) -> str:
        return f"perturbation '{self.name}' from plugin '{self.plugin}'"

    def __call__(self, model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor | Adversarial:
        try:
            with preserved_state(model):
                out = self.perturb(model, x.clone(), y.clone())
        except (UsageError, PluginError, KeyboardInterrupt):
            raise
        except (Exception, SystemExit) as exc:
            raise PluginError(f"{self.what} failed: {type(exc).__name__}: {exc}") from exc
        adv = as_adversarial(out) if isinstance(out, tuple) else None
        x_adv = validate_output(out if adv is None else adv.x, x, self.what)
        bad = ~self.ball.contains(x_adv, x, tol=0.0)
        x_adv = self.ball.project(x_adv, x)
        if adv is None or adv.targets is None:
            self._count(bad)
            return x_adv if adv is None else Adversarial(x_adv, None)
        targets, bad_rows = self._checked_targets(adv.targets, y)
        self._count(bad | bad_rows)
        return Adversarial(x_adv, targets)

    def _count(self, bad: Tensor) -> None:
        count = bad.sum()
        self.violations = count if self.violations is None else self.violations + count

    def _checked_targets(self, targets: object, y: Tensor) -> tuple[Tensor, Tensor]:
        """Targets of the right shape as float on ``y``'s device, invalid rows replaced by one-hot
        labels, and which rows were invalid."""
        k = self.num_classes
        if not (isinstance(targets, Tensor) and targets.dim() == 2 and targets.shape[0] == len(y)
                and targets.shape[1] >= 2 and (k is None or targets.shape[1] == k)):
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            want = f"({len(y)}, {k if k is not None else 'K'})"
            raise PluginError(f"{self.what} returned targets {got}, expected soft labels of shape {want}")
        if not targets.is_floating_point():
            raise PluginError(f"{self.what} returned targets of dtype {targets.dtype}, expected real "
                              "probabilities")
        t = targets.detach().to(device=y.device, dtype=torch.float32)
        ok = (torch.isfinite(t).all(1) & (t >= 0).all(1)
              & ((t.sum(1) - 1).abs() <= TARGET_TOLERANCE))
        onehot = F.one_hot(y.long(), t.shape[1]).to(t.dtype)
        return torch.where(ok[:, None], torch.nan_to_num(t), onehot), ~ok

    def take_violations(self) -> int:
        """How many examples were forced back into the threat model (or had their targets replaced)
        since the last call."""
        if self.violations is None:
            return 0
        n = int(self.violations)
        self.violations = None
        return n
