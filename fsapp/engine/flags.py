"""Warning flags of EVALUATION.md computed from a report's results (gradient masking signs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fsapp.engine.evaluate import Report

GAP_THRESHOLD = 0.05


def _flag(flag_id: str, message: str) -> dict[str, str]:
    return {"id": flag_id, "message": message}


def compute_flags(report: "Report") -> list[dict[str, str]]:
    """Flags whose inputs exist in ``report``."""
    flags: list[dict[str, str]] = []
    acc = report.accuracy
    by_name: dict[str, list] = {}
    for run in report.attacks:
        by_name.setdefault(run.name, []).append(run)
        if run.invalid:
            flags.append(_flag(
                "invalid-examples",
                f"{run.spec} returned {run.invalid} examples outside the threat model; they were projected",
            ))
    single = [acc[r.spec] for r in by_name.get("fgsm", [])]
    iterative = [acc[r.spec] for r in by_name.get("pgd", [])]
    if single and iterative and min(single) < min(iterative):
        flags.append(_flag(
            "single-step-beats-iterative",
            f"FGSM accuracy {min(single):.1%} < PGD accuracy {min(iterative):.1%}: gradients may be masked",
        ))
    for name, runs in by_name.items():
        ordered = sorted(
            (r for r in runs if "steps" in r.params), key=lambda r: (r.params["steps"], r.params.get("eps", 0))
        )
        for a, b in zip(ordered, ordered[1:]):
            same_eps = a.params.get("eps") == b.params.get("eps")
            if same_eps and b.params["steps"] > a.params["steps"] and acc[b.spec] > acc[a.spec] + 1e-9:
                flags.append(_flag(
                    "more-steps-raise-accuracy",
                    f"{b.spec} ({acc[b.spec]:.1%}) is above {a.spec} ({acc[a.spec]:.1%}): the attack is not converging",
                ))
    gap = report.gap
    if gap is not None and gap > GAP_THRESHOLD:
        flags.append(_flag(
            "ce-margin-gap",
            f"cross-entropy PGD is {gap:.1%} above the margin-loss attack: CE gradients look masked "
            "(the gap that exposed Feature Scattering)",
        ))
    return flags
