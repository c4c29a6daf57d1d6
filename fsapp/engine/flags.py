"""The warning flags of EVALUATION.md: signs that an evaluation over-states robustness.

Each flag is ``{"id": ..., "message": ...}`` and is raised only where its inputs exist:

- ``single-step-beats-iterative``: FGSM (or any 1-step attack) is stronger than an iterative one
  with the same loss family and eps;
- ``more-steps-raise-accuracy``: more steps or restarts of the same attack give a higher accuracy;
- ``accuracy-rises-with-eps`` / ``no-decay-at-large-eps``: accuracy grows with eps, or stays above
  10% at eps >= 0.3; ``unbounded-attack-fails``: an attack without an eps bound leaves points;
- ``black-box-beats-white-box``: a score-based (Square), decision-based or transfer attack finds
  more than 0.2 points of accuracy the white-box attacks missed;
- ``ce-margin-gap``: cross-entropy attacks are more than 5 points weaker than margin-loss ones;
- ``random-forward``, ``output-probabilities``, ``zero-gradient``: model checks on the clean data;
- ``non-finite-output``: the model's output held NaN or infinite values (such a row never counts
  as a correct prediction, clean or under attack);
- ``invalid-examples``: an attack returned points outside its threat model (they were projected).

Every message ends with where to read more: `` (docs/EVALUATION.md#<flag id>)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsapp.engine.report import AttackRun, Report

GAP_THRESHOLD = 0.05
BLACK_BOX_MARGIN = 0.002
LARGE_EPS = 0.3
LARGE_EPS_MAX_ACCURACY = 0.1

FLAG_IDS = (
    "single-step-beats-iterative",
    "more-steps-raise-accuracy",
    "accuracy-rises-with-eps",
    "no-decay-at-large-eps",
    "unbounded-attack-fails",
    "black-box-beats-white-box",
    "ce-margin-gap",
    "random-forward",
    "output-probabilities",
    "zero-gradient",
    "invalid-examples",
    "non-finite-output",
)

DOCS = "docs/EVALUATION.md"


def doc_reference(flag_id: str) -> str:
    """Where a flag is explained: ``docs/EVALUATION.md#<flag id>``."""
    return f"{DOCS}#{flag_id}"


def _flag(flag_id: str, message: str) -> dict[str, str]:
    return {"id": flag_id, "message": f"{message} ({doc_reference(flag_id)})"}


def check_flags(checks: dict[str, Any]) -> list[dict[str, str]]:
    """Flags from the model checks the evaluator runs on the clean data."""
    flags: list[dict[str, str]] = []
    if not checks:
        return flags
    n = checks.get("checked", 0)
    if checks.get("random_forward", 0) > 0:
        flags.append(_flag(
            "random-forward",
            f"the forward pass is random: two eval-mode passes disagree on {checks['random_forward']} of {n} "
            "samples; gradient attacks see noise, use an EOT attack (e.g. ta-eotpgd) before trusting the numbers",
        ))
    if n > 0 and checks.get("probability_rows", 0) == n:
        flags.append(_flag(
            "output-probabilities",
            "the model's outputs look like probabilities (in [0, 1], summing to 1), not logits: losses on them "
            "saturate and mask gradients; evaluate the network before its softmax",
        ))
    if checks.get("zero_gradient", 0) > 0:
        flags.append(_flag(
            "zero-gradient",
            f"the input gradient of the cross-entropy is exactly zero for {checks['zero_gradient']} of "
            f"{checks.get('checked_correct', n)} correctly classified samples: gradient attacks cannot move "
            "there (non-differentiable or thresholding layer, saturated softmax)",
        ))
    return flags


def _same_eps(a: AttackRun, b: AttackRun) -> bool:
    return a.threat.norm == b.threat.norm and a.threat.eps == b.threat.eps


def _group_key(run: AttackRun, vary: str) -> tuple:
    rest = tuple(sorted((k, repr(v)) for k, v in run.params.items() if k not in (vary, "keep")))
    return (run.name, run.transfer, rest)


def compute_flags(report: Report) -> list[dict[str, str]]:
    """Flags whose inputs exist in ``report`` (the model-check flags come from :func:`check_flags`)."""
    acc, runs = report.accuracy, list(report.attacks)
    white = [r for r in runs if r.access == "gradient" and not r.transfer]
    return (_output_flags(report, runs) + _step_flags(acc, runs, white) + _budget_flags(acc, runs, white)
            + _black_box_flags(acc, runs, white) + _gap_flags(report))


def _output_flags(report: Report, runs: list[AttackRun]) -> list[dict[str, str]]:
    """Examples outside the threat model, non-finite outputs, inputs without a gradient."""
    flags: list[dict[str, str]] = []
    for run in runs:
        if run.invalid:
            flags.append(_flag(
                "invalid-examples",
                f"{run.key} returned {run.invalid} examples outside its threat model ({run.threat}), [0, 1] or "
                "non-finite; they were projected before counting",
            ))

    non_finite = {"clean data": int(report.checks.get("non_finite", 0))}
    non_finite.update({run.key: run.non_finite for run in runs})
    hits = [f"{count} on {where}" for where, count in non_finite.items() if count]
    if hits:
        flags.append(_flag(
            "non-finite-output",
            f"the model's output held NaN or infinite values ({', '.join(hits)}); those rows count as "
            "misclassified, never as any class: find the overflow (half precision, a division, a log of 0)",
        ))

    for run in runs:
        if run.no_gradient:
            flags.append(_flag(
                "zero-gradient",
                f"{run.key} could not differentiate the model with respect to its input on {run.no_gradient} "
                "points (the output does not depend differentiably on the input); they count as not fooled by it",
            ))

    return flags


def _step_flags(acc: dict[str, float], runs: list[AttackRun], white: list[AttackRun]) -> list[dict[str, str]]:
    """A single step beating an iterative attack; more steps or restarts raising accuracy."""
    flags: list[dict[str, str]] = []
    # single-step vs iterative, per loss family and eps
    single = [r for r in white if r.name == "fgsm" or r.params.get("steps") == 1]
    iterative = [r for r in white if isinstance(r.params.get("steps"), int) and r.params["steps"] > 1]
    for s in single:
        peers = [r for r in iterative if _same_eps(r, s) and (r.loss == s.loss or s.loss is None)]
        if peers:
            best = min(peers, key=lambda r: acc[r.key])
            if acc[s.key] < acc[best.key] - 1e-12:
                flags.append(_flag(
                    "single-step-beats-iterative",
                    f"{s.key} ({acc[s.key]:.1%}) is stronger than the iterative {best.key} ({acc[best.key]:.1%}): "
                    "gradients may be masked",
                ))

    # more steps / restarts raise accuracy
    for vary in ("steps", "restarts"):
        groups: dict[tuple, list[AttackRun]] = {}
        for r in runs:
            if isinstance(r.params.get(vary), int):
                groups.setdefault(_group_key(r, vary), []).append(r)
        for members in groups.values():
            ordered = sorted(members, key=lambda r: r.params[vary])
            for a, b in zip(ordered, ordered[1:], strict=False):
                if b.params[vary] > a.params[vary] and acc[b.key] > acc[a.key] + 1e-12:
                    flags.append(_flag(
                        "more-steps-raise-accuracy",
                        f"{b.key} ({acc[b.key]:.1%}) is above {a.key} ({acc[a.key]:.1%}): more {vary} should never "
                        "help the model; the attack is not converging",
                    ))

    return flags


def _budget_flags(acc: dict[str, float], runs: list[AttackRun], white: list[AttackRun]) -> list[dict[str, str]]:
    """Accuracy that does not decay at a large eps; an unbounded attack that fails."""
    flags: list[dict[str, str]] = []
    # large eps and unbounded attacks
    for r in white:
        if r.threat.eps is not None and r.threat.norm == "Linf" and r.threat.eps >= LARGE_EPS \
                and acc[r.key] > LARGE_EPS_MAX_ACCURACY:
            flags.append(_flag(
                "no-decay-at-large-eps",
                f"{r.key} leaves {acc[r.key]:.1%} at eps {r.threat.eps:.3g}: accuracy should fall towards 0 as eps "
                f"grows to {LARGE_EPS}+",
            ))
    for r in runs:
        if r.threat.eps is None and acc[r.key] > 0:
            flags.append(_flag(
                "unbounded-attack-fails",
                f"the unbounded attack {r.key} leaves {acc[r.key]:.1%} of the samples correctly classified; an "
                "unbounded attack must reach 0% (the attack or the gradients are failing)",
            ))

    return flags


def _black_box_flags(acc: dict[str, float], runs: list[AttackRun],
                     white: list[AttackRun]) -> list[dict[str, str]]:
    """Transfer, score- or decision-based attacks (or stages) beating the white-box ones."""
    flags: list[dict[str, str]] = []
    # black-box / transfer / score-based attacks beat the white-box ones
    baseline = [acc[r.key] for r in white if r.in_worst_case and r.access == "gradient"]
    for r in runs:
        if r.transfer or r.access in ("score", "decision"):
            if baseline and r.in_worst_case and acc[r.key] < min(baseline) - BLACK_BOX_MARGIN:
                kind = "transfer" if r.transfer else r.access + "-based"
                flags.append(_flag(
                    "black-box-beats-white-box",
                    f"the {kind} attack {r.key} ({acc[r.key]:.1%}) beats every white-box attack "
                    f"({min(baseline):.1%}) by more than {BLACK_BOX_MARGIN:.1%}: white-box gradients are masked",
                ))
        previous = None
        for name, mask in r.stages.items():
            now = int(mask.sum()) / mask.numel() if mask.numel() else 0.0
            if previous is not None and r.stage_access.get(name) in ("score", "decision") \
                    and now < previous - BLACK_BOX_MARGIN:
                flags.append(_flag(
                    "black-box-beats-white-box",
                    f"{name} in {r.key} lowered robust accuracy from {previous:.1%} to {now:.1%} after the white-box "
                    f"stages: more than {BLACK_BOX_MARGIN:.1%}, the white-box evaluation is unreliable",
                ))
            previous = now

    return flags


def _gap_flags(report: Report) -> list[dict[str, str]]:
    """Cross-entropy attacks well above margin-loss attacks."""
    flags: list[dict[str, str]] = []
    gap = report.gap
    if gap is not None and gap > GAP_THRESHOLD:
        flags.append(_flag(
            "ce-margin-gap",
            f"cross-entropy attacks are {gap:.1%} above margin-loss attacks: CE gradients look masked "
            "(the gap that exposed Feature Scattering)",
        ))
    return flags


def curve_flags(key: str, values: Sequence[float], curves: dict[str, Sequence[float]]) -> list[dict[str, str]]:
    """Flags from an accuracy curve over ``key`` (eps, steps or restarts)."""
    flags: list[dict[str, str]] = []
    order = sorted(range(len(values)), key=lambda i: values[i])
    for label, accs in curves.items():
        pts = [(values[i], accs[i]) for i in order if accs[i] is not None]
        rises = [(a, b) for a, b in zip(pts, pts[1:], strict=False) if b[0] > a[0] and b[1] > a[1] + 1e-12]
        if rises:
            (v0, a0), (v1, a1) = rises[0]
            if key == "eps":
                flags.append(_flag(
                    "accuracy-rises-with-eps",
                    f"{label}: accuracy rises from {a0:.1%} at eps {v0:.4g} to {a1:.1%} at eps {v1:.4g}; a larger "
                    "ball can only help the attacker",
                ))
            elif key in ("steps", "restarts"):
                flags.append(_flag(
                    "more-steps-raise-accuracy",
                    f"{label}: accuracy rises from {a0:.1%} at {key}={v0:g} to {a1:.1%} at {key}={v1:g}; the "
                    "attack is not converging",
                ))
        if key == "eps" and pts and pts[-1][0] >= LARGE_EPS and pts[-1][1] > LARGE_EPS_MAX_ACCURACY:
            flags.append(_flag(
                "no-decay-at-large-eps",
                f"{label}: {pts[-1][1]:.1%} accuracy left at eps {pts[-1][0]:.3g}; it should fall towards 0 as eps "
                f"grows to {LARGE_EPS}+",
            ))
    return flags
