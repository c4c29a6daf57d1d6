"""Guards around third-party components: malformed results are caught and reported by plugin."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fsapp.adversary import linf, preserved_state
from fsapp.engine.checks import validate_output
from fsapp.errors import PluginError, UsageError

Perturb = Callable[[torch.nn.Module, Tensor, Tensor], Tensor]


class GuardedPerturbation:
    """Wraps a plugin's perturbation for training.

    The plugin gets copies of ``x`` and ``y`` (an in-place edit cannot move the centre of its ball
    or the clean batch the loss sees) and runs with the model's modes and buffers saved and
    restored (it cannot change BatchNorm statistics of the model under training). Its output's
    type and shape are checked, and every example is forced into the eps-ball and [0, 1]
    (non-finite values fall back to the clean input). Violations are counted on the device (no
    host sync) and read by the loop when it reports. An exception from the plugin is one line
    naming it.
    """

    def __init__(self, perturb: Perturb, epsilon: float | None, name: str, plugin: str) -> None:
        self.perturb = perturb
        self.ball = linf(epsilon)
        self.name = name
        self.plugin = plugin
        self.violations: Tensor | None = None

    @property
    def what(self) -> str:
        return f"perturbation '{self.name}' from plugin '{self.plugin}'"

    def __call__(self, model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
        try:
            with preserved_state(model):
                out = self.perturb(model, x.clone(), y.clone())
        except (UsageError, PluginError, KeyboardInterrupt):
            raise
        except (Exception, SystemExit) as exc:
            raise PluginError(f"{self.what} failed: {type(exc).__name__}: {exc}") from exc
        x_adv = validate_output(out, x, self.what)
        count = (~self.ball.contains(x_adv, x, tol=0.0)).sum()
        self.violations = count if self.violations is None else self.violations + count
        return self.ball.project(x_adv, x)

    def take_violations(self) -> int:
        """How many examples were forced back into the threat model since the last call."""
        if self.violations is None:
            return 0
        n = int(self.violations)
        self.violations = None
        return n
