"""Guards around third-party components: malformed results are caught and reported by plugin."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fsapp.errors import PluginError

Perturb = Callable[[torch.nn.Module, Tensor, Tensor], Tensor]


class GuardedPerturbation:
    """Wraps a plugin's perturbation: checks its output's type and shape, and forces every example
    into the eps-ball and [0, 1] (non-finite values fall back to the clean input). Violations are
    counted on the device (no host sync) and read by the loop when it reports."""

    def __init__(self, perturb: Perturb, epsilon: float | None, name: str, plugin: str) -> None:
        self.perturb = perturb
        self.epsilon = epsilon
        self.name = name
        self.plugin = plugin
        self.violations: Tensor | None = None

    def __call__(self, model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv = self.perturb(model, x, y)
        if not isinstance(x_adv, Tensor) or x_adv.shape != x.shape:
            got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
            raise PluginError(
                f"perturbation '{self.name}' from plugin '{self.plugin}' returned {got}, expected a tensor "
                f"of shape {tuple(x.shape)}"
            )
        x_adv = x_adv.detach().to(x.dtype)
        fixed = torch.where(torch.isfinite(x_adv), x_adv, x)
        if self.epsilon is not None:
            fixed = torch.max(torch.min(fixed, x + self.epsilon), x - self.epsilon)
        fixed = fixed.clamp(0, 1)
        count = (fixed != x_adv).flatten(1).any(1).sum()  # NaN != anything, so NaNs count too
        self.violations = count if self.violations is None else self.violations + count
        return fixed

    def take_violations(self) -> int:
        """How many examples were forced back into the threat model since the last call."""
        if self.violations is None:
            return 0
        n = int(self.violations)
        self.violations = None
        return n
