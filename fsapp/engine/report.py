"""What an evaluation produces: each attack's run, the report, and the progress it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fsapp.adversary import ThreatModel
from fsapp.engine.evalstate import mask_to_str


def frac(mask: Tensor) -> float:
    """The fraction of True entries, exactly (count / n)."""
    return int(mask.sum()) / mask.numel() if mask.numel() else 0.0


@dataclass
class AttackRun:
    """One attack's settings, per-sample robustness and cost.

    ``stages`` maps each stage of a staged attack to the cumulative per-sample robustness after
    it; ``transfer`` attacks were crafted on a source model and measured on the evaluated one;
    ``non_finite`` counts examples on which the evaluated model's output was not finite;
    ``seconds`` is the attack's time over its batches and ``stage_seconds`` splits it by stage
    (each stage's attack, its example checks and the fresh forward on its examples); ``notes``
    says why each stage of an ``adaptive`` run was chosen.
    """

    spec: str
    name: str
    params: dict[str, Any]
    robust: Tensor
    seconds: float
    invalid: int = 0
    threat: ThreatModel = ThreatModel("Linf", None)
    access: str = "gradient"
    loss: str | None = None
    transfer: bool = False
    in_worst_case: bool = True
    resolved: str = ""
    stages: dict[str, Tensor] = field(default_factory=dict)
    stage_access: dict[str, str] = field(default_factory=dict)
    no_gradient: int = 0
    non_finite: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The key of this attack in ``Report.accuracy``."""
        return f"transfer/{self.spec}" if self.transfer else self.spec


@dataclass
class Report:
    """An evaluation report; ``accuracy`` maps "clean", each attack's key and "worst_case"."""

    n: int
    accuracy: dict[str, float]
    clean: Tensor
    worst_case: Tensor
    attacks: list[AttackRun] = field(default_factory=list)
    flags: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    threat: ThreatModel | None = None
    seed: int = 0
    batch_size: int = 0
    checks: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    resumed_batches: int = 0

    @property
    def gap(self) -> float | None:
        """White-box cross-entropy accuracy minus margin-loss (CW/DLR) accuracy, when both ran."""
        ce = [self.accuracy[r.key] for r in self._white_box() if r.loss == "ce"]
        margin = [self.accuracy[r.key] for r in self._white_box() if r.loss == "margin"]
        if not ce or not margin:
            return None
        return min(ce) - min(margin)

    def _white_box(self) -> list[AttackRun]:
        return [r for r in self.attacks if r.access == "gradient" and not r.transfer and r.in_worst_case]

    def stage_accuracy(self, run: AttackRun) -> dict[str, float]:
        """Cumulative accuracy after each stage of a staged attack."""
        return {name: frac(mask) for name, mask in run.stages.items()}

    def escalations(self, run: AttackRun) -> dict[str, dict[str, Any]]:
        """Each stage of an ``adaptive`` run: why it ran and how many points it fooled."""
        before = self.clean.clone()
        for other in self.attacks:
            if other is run:
                break
            if other.in_worst_case:
                before &= other.robust
        out: dict[str, dict[str, Any]] = {}
        for name, mask in run.stages.items():
            out[name] = {"reason": run.notes.get(name, ""), "fooled": int((before & ~mask).sum())}
            before = mask
        return out

    def to_dict(self, per_sample: bool = True) -> dict[str, Any]:
        """The JSON report (``per_sample``: 0/1 strings of each attack's and the worst-case mask)."""
        data: dict[str, Any] = {
            "n": self.n,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "threat_model": self.threat.to_dict() if self.threat else None,
            "accuracy": dict(self.accuracy),
            "robust_count": {"clean": int(self.clean.sum()), "worst_case": int(self.worst_case.sum()),
                             **{r.key: int(r.robust.sum()) for r in self.attacks}},
            "gap_ce_minus_margin": self.gap,
            "attacks": [
                {"key": r.key, "spec": r.spec, "resolved": r.resolved, "name": r.name, "params": r.params,
                 "threat_model": r.threat.to_dict(), "access": "transfer" if r.transfer else r.access,
                 "loss": r.loss, "in_worst_case": r.in_worst_case, "accuracy": self.accuracy[r.key],
                 "stages": self.stage_accuracy(r), "seconds": r.seconds, "invalid_examples": r.invalid,
                 "no_gradient": r.no_gradient, "non_finite_outputs": r.non_finite,
                 **({"escalations": self.escalations(r)} if r.notes else {})}
                for r in self.attacks
            ],
            "checks": dict(self.checks),
            "flags": list(self.flags),
            # every clock reading lives here and in "seconds" (two runs of one evaluation differ only there)
            "timings": {"total": self.seconds, **{r.key: r.seconds for r in self.attacks},
                        "stages": {r.key: dict(r.stage_seconds) for r in self.attacks if r.stage_seconds},
                        "images_per_sec": {r.key: self.n / r.seconds for r in self.attacks if r.seconds > 0}},
            "seconds": self.seconds,
            "world_size": self.world_size,
        }
        if per_sample:
            data["per_sample"] = {"clean": mask_to_str(self.clean), "worst_case": mask_to_str(self.worst_case),
                                  **{r.key: mask_to_str(r.robust) for r in self.attacks}}
        return data


@dataclass(frozen=True)
class EvalProgress:
    """Progress of one attack: ``done`` of ``total`` samples (this process's share), ``robust`` of
    ``done`` still robust, the current ``stage`` of a staged attack, seconds so far, and whether the
    batch was ``resumed`` from a state file rather than attacked. Every attack first reports
    ``done=0``."""

    key: str
    stage: str
    done: int
    total: int
    robust: int
    seconds: float
    resumed: bool = False
