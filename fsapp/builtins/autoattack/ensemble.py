"""The AutoAttack ensembles: the standard version (APGD-CE, APGD-T, FAB-T, Square at the reference
settings) and a cheaper variant with its own name. Each is an :class:`fsapp.adversary.Attack`
whose ``stages`` :func:`fsapp.adversary.cascade` runs in order on the points still robust."""

from __future__ import annotations

from dataclasses import dataclass

from fsapp.builtins.autoattack.apgd import APGD, APGDParams
from fsapp.builtins.autoattack.common import LinfAttack, check_common
from fsapp.builtins.autoattack.fab import FABTargeted, FABTParams
from fsapp.builtins.autoattack.square import Square, SquareParams


@dataclass
class AutoAttackParams:
    """AutoAttack, standard version: APGD-CE, APGD-T, FAB-T, Square at the reference settings."""

    eps: float = 8 / 255
    seed: int | None = None

    def __post_init__(self) -> None:
        check_common(self.eps, 1)


@dataclass
class AutoAttackFastParams:
    """A cheaper AutoAttack-like ensemble (NOT the standard version): APGD-CE, APGD-T, [FAB-T], Square."""

    eps: float = 8 / 255
    steps: int = 20
    targets: int = 3
    fab: bool = False
    queries: int = 1000
    seed: int | None = None

    def __post_init__(self) -> None:
        check_common(self.eps, 1)
        if self.steps < 1 or self.targets < 1 or self.queries < 0:
            raise ValueError("steps and targets must be >= 1, queries >= 0")


@dataclass
class ScreenParams:
    """The screening tier: APGD-CE, then APGD-T on the ``targets`` nearest boundaries (MALT order)."""

    eps: float = 8 / 255
    steps: int = 100
    targets: int = 3
    seed: int | None = None

    def __post_init__(self) -> None:
        check_common(self.eps, 1)
        if self.steps < 1 or self.targets < 1:
            raise ValueError("steps and targets must be >= 1")


class AutoAttack(LinfAttack):
    """An ensemble whose ``stages`` run in order, each on the points the previous ones left robust.

    Called directly it runs :func:`fsapp.adversary.cascade` in eval mode (the base class's
    ``__call__``); :func:`fsapp.engine.evaluate.evaluate` runs the same cascade with every stage's
    examples checked and each stage's accuracy reported.
    """

    loss = "mixed"

    def __init__(self, eps: float, stages: list[tuple[str, LinfAttack]]) -> None:
        self.eps = eps
        self.stages = stages


def standard_autoattack(p: AutoAttackParams) -> AutoAttack:
    """The standard version, at the reference settings."""
    return AutoAttack(p.eps, [
        ("apgd-ce", APGD(APGDParams(eps=p.eps, steps=100, restarts=1, seed=p.seed), "ce")),
        ("apgd-t", APGD(APGDParams(eps=p.eps, steps=100, restarts=1, seed=p.seed), "dlr", targets=9, strict=False)),
        ("fab-t", FABTargeted(FABTParams(eps=p.eps, steps=100, targets=9, restarts=1, seed=p.seed))),
        ("square", Square(SquareParams(eps=p.eps, queries=5000, restarts=1, seed=p.seed))),
    ])


def screen(p: ScreenParams) -> AutoAttack:
    """``screen``: APGD-CE and APGD-T on the nearest ``targets`` classes (MALT ordering), each at
    ``steps`` iterations; the cheap tier for live evaluation (its agreement with the full
    ``autoattack`` is measured in docs/benchmarks.md)."""
    return AutoAttack(p.eps, [
        ("apgd-ce", APGD(APGDParams(eps=p.eps, steps=p.steps, seed=p.seed), "ce")),
        ("apgd-t", APGD(APGDParams(eps=p.eps, steps=p.steps, seed=p.seed), "dlr", targets=p.targets, strict=False,
                        order="malt")),
    ])


def fast_autoattack(p: AutoAttackFastParams) -> AutoAttack:
    """The cheaper variant (``autoattack-fast``) for quick looks; NOT the standard version (live
    evaluation during training runs the standard ``autoattack`` on ``eval.autoattack_n`` samples)."""
    stages: list[tuple[str, LinfAttack]] = [
        ("apgd-ce", APGD(APGDParams(eps=p.eps, steps=p.steps, seed=p.seed), "ce")),
        ("apgd-t", APGD(APGDParams(eps=p.eps, steps=p.steps, seed=p.seed), "dlr", targets=p.targets, strict=False)),
    ]
    if p.fab:
        stages.append(("fab-t", FABTargeted(FABTParams(eps=p.eps, steps=p.steps, targets=p.targets, seed=p.seed))))
    if p.queries > 0:
        stages.append(("square", Square(SquareParams(eps=p.eps, queries=p.queries, seed=p.seed))))
    return AutoAttack(p.eps, stages)

