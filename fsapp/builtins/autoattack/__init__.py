"""AutoAttack (Croce & Hein 2020), native: APGD-CE, APGD-DLR, APGD-T, FAB-T, Square, and the ensemble.

Split as the reference (github fra31/auto-attack) splits it: :mod:`.apgd`, :mod:`.fab`,
:mod:`.square` and :mod:`.ensemble`. The algorithms follow the reference as ported to
torchattacks (MIT licence), step for step and random draw for draw, so that with the same seed
and the same batch they return the same examples; loops avoid host syncs where the reference
indexes with ``nonzero``. Linf only.

``autoattack`` is the *standard* version (the RobustBench protocol): APGD-CE (100 iterations,
1 restart), then APGD-T (DLR loss, 9 target classes, 100 iterations), then FAB-T (9 target
classes, 100 iterations), then Square (5000 queries), each on the points still robust. It takes
no knobs but ``eps`` and ``seed``; ``autoattack-fast`` is a cheaper variant with its own name.

Every component is an :class:`fsapp.adversary.Attack` carrying its threat model and kind for the
evaluator: ``norm``, ``eps``, ``access`` ("gradient" or "score") and ``loss``; the ensembles expose
``stages`` (name, attack) that the evaluator runs in order on the points still robust, checking
each stage's examples.
"""

from __future__ import annotations

import fsapp.engine.adaptive as adaptive  # its attack is registered here; it imports .apgd and .square
from fsapp.builtins.autoattack.apgd import (
    APGD,
    APGDParams,
    APGDTParams,
    apgd,
    dlr_loss,
    dlr_loss_targeted,
    malt_order,
)
from fsapp.builtins.autoattack.ensemble import (
    AutoAttack,
    AutoAttackFastParams,
    AutoAttackParams,
    ScreenParams,
    fast_autoattack,
    screen,
    standard_autoattack,
)
from fsapp.builtins.autoattack.fab import FABTargeted, FABTParams, fab_targeted
from fsapp.builtins.autoattack.square import Square, SquareParams, square_linf
from fsapp.hookspecs import hookimpl

__all__ = [
    "APGD",
    "AutoAttack",
    "FABTargeted",
    "Square",
    "apgd",
    "dlr_loss",
    "dlr_loss_targeted",
    "fab_targeted",
    "malt_order",
    "square_linf",
]


@hookimpl
def register_attacks(register) -> None:  # noqa: ANN001 - the hook's register callback
    """Register APGD, FAB-T, Square and the AutoAttack ensembles."""
    register("apgd-ce", lambda p: APGD(p, "ce"), params=APGDParams,
             description="APGD on cross-entropy (AutoAttack's first stage; 100 steps)")
    register("apgd-dlr", lambda p: APGD(p, "dlr"), params=APGDParams,
             description="APGD on the DLR margin loss (untargeted)")
    register("apgd-t", lambda p: APGD(p, "dlr", targets=p.targets), params=APGDTParams,
             description="APGD on the targeted DLR loss, top-9 target classes (AutoAttack's APGD-T)")
    register("fab-t", FABTargeted, params=FABTParams,
             description="targeted FAB, minimal Linf distortion, top-9 target classes (AutoAttack's FAB-T)")
    register("square", Square, params=SquareParams,
             description="Square Attack: score-based random search, 5000 queries (black-box)")
    register("autoattack", standard_autoattack, params=AutoAttackParams,
             description="AutoAttack, standard version: APGD-CE, APGD-T, FAB-T, Square (RobustBench protocol)")
    register("screen", screen, params=ScreenParams,
             description="screening tier: APGD-CE + APGD-T on the 3 nearest boundaries (MALT order), 6-8x cheaper; "
                         "agreed with autoattack on 100% of 2x400 digits samples (docs/benchmarks.md)")
    register("adaptive", adaptive.Adaptive, params=adaptive.AdaptiveParams,
             description="escalations after the other attacks, chosen by the flags and the model's declarations: "
                         "BPDA, EOT, transfer, heavier Square (suite 'adaptive' runs it after autoattack)")
    register("autoattack-fast", fast_autoattack, params=AutoAttackFastParams,
             description="cheaper AutoAttack-like ensemble (20-step APGD-CE/APGD-T, Square 1000); not standard")

