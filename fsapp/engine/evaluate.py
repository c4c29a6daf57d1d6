"""Robustness evaluation: clean accuracy, each attack, and the per-sample worst case.

Every adversarial example is checked before it counts (inside its threat model's ball plus
1e-6, inside [0, 1], finite; an invalid one is projected back and reported) and accuracy is
recomputed with a fresh eval-mode forward on the returned examples. A sample is robust only if
no attack found a misclassified point for it (attacks track their restarts and iterates).

How an evaluation runs:

- The samples are cut into batches of a fixed order; each (attack, batch) is seeded from
  ``(seed, batch index, attack name)``, so results do not depend on what ran before, on
  resuming, or on how batches are dealt to ``torchrun`` processes (``shard=True``).
- Only the points still correctly classified are attacked. An attack that exposes ``stages``
  (``autoattack``) has its stages run in order, each on the points the previous ones left robust,
  and each stage's cumulative accuracy is reported.
- Attacks declare their threat model and kind with optional attributes of the attack object:
  ``norm`` ("Linf", "L2", "L1") and ``eps`` (None: unbounded), ``access`` ("gradient", "score",
  "decision") and ``loss`` ("ce", "margin"). Without them, an ``eps`` parameter means Linf and no
  ``eps`` means unbounded; a params dataclass may carry ``norm: ClassVar[str] = "L2"`` so that the
  report's Linf eps is never filled into it. The worst case counts only attacks inside the report's
  threat model (``defaults["eps"]`` if given, else the largest Linf eps among the attacks).
- An attack that cannot differentiate the model (no gradient path to the input) finds nothing on
  those points; this is counted, reported and flagged (``zero-gradient``), not a crash.
- Model checks run on the clean data: random forward passes, probability outputs, all-zero input
  gradients. They and the attack results feed the flags of :mod:`fsapp.engine.flags`.
- With ``state=PATH`` every finished batch is saved atomically; ``resume=True`` continues it.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fsapp.errors import PluginError, UsageError
from fsapp.registry import Spec, format_value, make_params, parse_spec

BALL_TOLERANCE = 1e-6

SUITES: dict[str, tuple[str, ...]] = {
    "default": ("pgd:steps=20", "cw:steps=20"),
    "paper": ("fgsm:random_start=true", "pgd:steps=20", "pgd:steps=100", "cw:steps=20", "cw:steps=100"),
    "autoattack": ("autoattack",),
}
"""Named attack lists. ``paper``: the paper's protocol (FGSM with a random start and step eps,
PGD-20/100 and CW-20/100 with step eps/4 and a random start); ``autoattack``: the standard
AutoAttack ensemble."""

_BUILTIN_KIND = {"fgsm": ("gradient", "ce"), "pgd": ("gradient", "ce"), "cw": ("gradient", "margin")}


# --------------------------------------------------------------------------- threat models


@dataclass(frozen=True)
class ThreatModel:
    """A norm ball: ``norm`` "Linf", "L2" or "L1" (None: undeclared), ``eps`` None = unbounded."""

    norm: str | None
    eps: float | None

    def within(self, other: "ThreatModel | None") -> bool:
        """Whether every point allowed by ``self`` is allowed by ``other``."""
        if other is None:
            return True
        if self.norm != other.norm or self.eps is None:
            return False
        return other.eps is None or self.eps <= other.eps + 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps}

    def __str__(self) -> str:
        norm = self.norm or "?"
        return f"{norm} unbounded" if self.eps is None else f"{norm} eps {self.eps:.4g}"


def _declared_norm(obj: Any) -> str | None:
    norm = getattr(obj, "norm", None)
    return norm if isinstance(norm, str) else None


def threat_of(attack: Any, params_cls: type, params: dict[str, Any]) -> ThreatModel:
    """An attack's threat model from its ``norm``/``eps`` attributes or its parameters."""
    norm = _declared_norm(attack) or _declared_norm(params_cls) or (
        params["norm"] if isinstance(params.get("norm"), str) else None)
    eps = getattr(attack, "eps", None)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        eps = params.get("eps")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps):
        eps = None
    if norm is None and "eps" in params:
        norm = "Linf"
    if norm is None and eps is None:
        norm = "unbounded"
    return ThreatModel(norm, float(eps) if eps is not None else None)


def kind_of(attack: Any, name: str) -> tuple[str, str | None]:
    """``(access, loss)`` of an attack: its attributes, else what is known of the built-ins."""
    access, loss = _BUILTIN_KIND.get(name, ("gradient", None))
    a = getattr(attack, "access", None)
    b = getattr(attack, "loss", None)
    return (a if isinstance(a, str) else access), (b if isinstance(b, str) else loss)


def apply_defaults(spec: str, defaults: dict[str, Any] | None) -> str:
    """Add ``key=value`` for each default the spec does not name, when the attack has that
    parameter and its default is not None (None means "derived", e.g. FGSM's step = eps). ``eps``
    and ``step_size`` defaults only apply to Linf attacks."""
    from fsapp.plugins import get_registry

    parsed = parse_spec(spec)
    if not defaults:
        return str(parsed)
    component = get_registry().get("attack", parsed.name)
    fields = {f.name: f for f in dataclasses.fields(component.params)}
    declared = _declared_norm(component.params)
    params = dict(parsed.params)
    for key, value in defaults.items():
        f = fields.get(key)
        if f is None or key in params or value is None:
            continue
        if f.default is None or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
            continue
        if key in ("eps", "step_size") and declared not in (None, "Linf"):
            continue
        params[key] = format_value(value)
    return str(Spec(parsed.name, params))


# --------------------------------------------------------------------------- results


@dataclass
class AttackRun:
    """One attack's settings, per-sample robustness and cost.

    ``stages`` maps each stage of a staged attack to the cumulative per-sample robustness after
    it; ``transfer`` attacks were crafted on a source model and measured on the evaluated one.
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
        return {name: _frac(mask) for name, mask in run.stages.items()}

    def to_dict(self, per_sample: bool = True) -> dict[str, Any]:
        """The JSON report (``per_sample``: 0/1 strings of each attack's and the worst-case mask)."""
        from fsapp.engine.evalstate import mask_to_str

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
                 "no_gradient": r.no_gradient}
                for r in self.attacks
            ],
            "checks": dict(self.checks),
            "flags": list(self.flags),
            "timings": {"total": self.seconds, **{r.key: r.seconds for r in self.attacks}},
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
    ``done`` still robust, the current ``stage`` of a staged attack, seconds so far."""

    key: str
    stage: str
    done: int
    total: int
    robust: int
    seconds: float
    resumed: bool = False


# --------------------------------------------------------------------------- helpers


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]


@torch.no_grad()
def predict(model: torch.nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Eval-mode predicted labels of ``x``, batch by batch (model mode restored)."""
    was_training = model.training
    model.eval()
    try:
        if len(x) == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        return torch.cat([model(x[s]).argmax(1) for s in _batches(len(x), batch_size)])
    finally:
        model.train(was_training)


def _check_examples(x: Tensor, x_adv: Tensor, threat: ThreatModel) -> tuple[Tensor, int]:
    """Force examples into the threat model and [0, 1]; return them and how many were invalid."""
    finite = torch.isfinite(x_adv).flatten(1).all(1)
    x_adv = torch.where(torch.isfinite(x_adv), x_adv, x)
    bad = ~finite
    eps = threat.eps
    if eps is not None:
        delta = (x_adv - x).flatten(1)
        if threat.norm == "L2":
            norms = delta.norm(dim=1)
            bad |= norms > eps + BALL_TOLERANCE
            scale = torch.clamp(eps / norms.clamp_min(1e-12), max=1.0)
            x_adv = x + (delta * scale[:, None]).view_as(x)
        elif threat.norm == "L1":
            norms = delta.abs().sum(1)
            bad |= norms > eps + BALL_TOLERANCE
            scale = torch.clamp(eps / norms.clamp_min(1e-12), max=1.0)
            x_adv = x + (delta * scale[:, None]).view_as(x)
        else:
            bad |= delta.abs().amax(1) > eps + BALL_TOLERANCE
            x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
    bad |= ((x_adv < 0) | (x_adv > 1)).flatten(1).any(1)
    return x_adv.clamp(0, 1), int(bad.sum())


def _batch_seed(seed: int, batch: int, name: str) -> None:
    torch.manual_seed(zlib.crc32(f"{seed}/{batch}/{name}".encode()) & 0x7FFFFFFF)


def _frac(mask: Tensor) -> float:
    """The fraction of True entries, exactly (count / n)."""
    return int(mask.sum()) / mask.numel() if mask.numel() else 0.0


def _model_checks(model: torch.nn.Module, x: Tensor, y: Tensor, clean: Tensor, logits: Tensor) -> dict[str, int]:
    """Counts behind the model flags, on one batch: random forward, probability rows, zero gradients."""
    with torch.no_grad():
        again = model(x).float()
    first = logits.float()
    differ = ((first - again).abs() > 1e-5 + 1e-4 * first.abs()).any(1)
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


# --------------------------------------------------------------------------- the evaluator


@dataclass
class _Plan:
    spec: str
    resolved: str
    name: str
    params: dict[str, Any]
    attack: Any
    threat: ThreatModel
    access: str
    loss: str | None
    transfer: bool
    stages: list[tuple[str, Any]]

    @property
    def key(self) -> str:
        return f"transfer/{self.spec}" if self.transfer else self.spec


def _plan(spec: str, defaults: dict[str, Any] | None, transfer: bool) -> _Plan:
    from fsapp.plugins import BUILTIN_PLUGIN, get_registry

    resolved = apply_defaults(spec, defaults)
    parsed = parse_spec(resolved)
    component = get_registry().get("attack", parsed.name)
    params = make_params(component, parsed.params)
    try:
        attack = component.factory(params)
    except (UsageError, PluginError):
        raise
    except Exception as exc:
        if component.plugin == BUILTIN_PLUGIN:
            raise UsageError(f"attack '{parsed.name}': {exc}") from None
        raise PluginError(f"attack '{parsed.name}' from plugin '{component.plugin}' failed to build: "
                          f"{type(exc).__name__}: {exc}") from exc
    pdict = dataclasses.asdict(params)
    threat = threat_of(attack, component.params, pdict)
    access, loss = kind_of(attack, parsed.name)
    stages = list(getattr(attack, "stages", None) or [])
    return _Plan(spec, resolved, parsed.name, pdict, attack, threat, access, loss, transfer, stages)


def _primary_threat(plans: list[_Plan], defaults: dict[str, Any] | None) -> ThreatModel | None:
    if defaults and isinstance(defaults.get("eps"), (int, float)):
        return ThreatModel("Linf", float(defaults["eps"]))
    bounded = [p.threat for p in plans if p.threat.eps is not None and p.threat.norm not in (None, "unbounded")]
    if not bounded:
        return None
    norm = bounded[0].norm
    return ThreatModel(norm, max(t.eps for t in bounded if t.norm == norm))  # type: ignore[type-var]


def evaluate(
    model: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: list[str],
    batch_size: int = 250,
    device: str | torch.device | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    defaults: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    source: torch.nn.Module | None = None,
    transfer: list[str] | tuple[str, ...] = (),
    state: str | Path | None = None,
    resume: bool = False,
    on_batch: Callable[[EvalProgress], None] | None = None,
    checks: bool = True,
    shard: bool = False,
    fingerprint: dict[str, Any] | None = None,
) -> Report:
    """Evaluate ``model`` on (x, y) against ``attacks`` (spec strings); see :class:`Report`.

    ``defaults`` (e.g. ``{"eps": 8/255, "step_size": 2/255}``) fill parameters that a spec does not
    name; the report still keys each attack by its spec as given. ``transfer`` specs are crafted
    on ``source`` and measured on ``model`` (keys ``transfer/<spec>``). ``seed`` seeds every
    (attack, batch); the caller's random state is left untouched. ``state``/``resume``: see the
    module docstring; ``shard``: deal batches to the ranks of an initialised process group.
    ``on_progress(key, done, total)`` and ``on_batch(EvalProgress)`` report progress; an exception
    raised by either stops the evaluation (finished batches stay in the state file). ``checks``
    runs the model checks on the clean data; ``fingerprint`` adds items a resumed state must match.
    """
    from fsapp.engine import evalshard

    start = time.perf_counter()
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise UsageError(f"x has {len(x)} samples but y has {len(y)}")
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    device = torch.device(device)
    x = x.to(device)
    y = y.to(device)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if transfer and source is None:
        raise UsageError("transfer attacks need a source model to craft them on")
    plans = [_plan(s, defaults, False) for s in attacks] + [_plan(s, defaults, True) for s in transfer]
    keys = [p.key for p in plans]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise UsageError(f"attack {dupes[0]!r} is listed twice")
    sh = evalshard.current() if shard else evalshard.Shard()
    modules = [model] + ([source] if source is not None else [])
    modes = [(m, m.training) for mod in modules for m in mod.modules()]
    for mod in modules:
        mod.eval()
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            return _evaluate(model, source, x, y, plans, batch_size, on_progress, on_batch, defaults, seed, state,
                             resume, checks, sh, fingerprint, start)
    finally:
        for m, training in modes:
            m.training = training


def _evaluate(model, source, x, y, plans, batch_size, on_progress, on_batch, defaults, seed, state_path,  # noqa: ANN001
              resume, checks, sh, fingerprint, start) -> Report:
    from fsapp.engine import evalshard
    from fsapp.engine.evalstate import EvalState, mask_to_str, model_digest, str_to_mask, tensor_digest
    from fsapp.engine.flags import check_flags, compute_flags

    n = len(y)
    device = x.device
    batches = _batches(n, batch_size)
    mine = [b for b in range(len(batches)) if sh.owns(b)]
    my_total = sum(batches[b].stop - batches[b].start for b in mine)
    primary = _primary_threat(plans, defaults)

    fp: dict[str, Any] = {}
    if state_path is not None:
        fp = {"n": n, "batch_size": batch_size, "seed": seed, "attacks": [p.resolved for p in plans],
              "transfer": [p.transfer for p in plans], "checks": checks, "rank": sh.rank, "world": sh.world,
              "data": tensor_digest(x, y), "model": model_digest(model),
              "source": model_digest(source) if source is not None else None, **(fingerprint or {})}
    st = EvalState.open(state_path, fp, resume)

    # -- clean accuracy and model checks -----------------------------------------------------
    clean = torch.zeros(n, dtype=torch.bool, device=device)
    check_counts = torch.zeros(5, dtype=torch.long)
    for b in mine:
        s = batches[b]
        rec = st.get("clean", b)
        if rec is None:
            with torch.no_grad():
                logits = model(x[s])
            ok = logits.argmax(1) == y[s]
            counts = _model_checks(model, x[s], y[s], ok, logits) if checks else {}
            rec = {"clean": mask_to_str(ok), "checks": counts}
            st.put("clean", b, rec)
        clean[s] = str_to_mask(rec["clean"], device)
        c = rec.get("checks") or {}
        check_counts += torch.tensor([c.get(k, 0) for k in ("random_forward", "probability_rows", "zero_gradient",
                                                               "checked", "checked_correct")])

    # -- attacks ---------------------------------------------------------------------------
    runs: list[AttackRun] = []
    for plan in plans:
        crafter = source if plan.transfer else model
        robust = clean.clone()
        stage_masks = {name: clean.clone() for name, _ in plan.stages}
        stage_access = {name: kind_of(a, name)[0] for name, a in plan.stages}
        invalid, no_gradient, seconds, done = 0, 0, 0.0, 0
        if on_progress is not None:
            on_progress(plan.key, 0, my_total)
        for b in mine:
            s = batches[b]
            rec = st.get(plan.key, b)
            resumed = rec is not None
            if rec is None:
                t0 = time.perf_counter()

                def notify(stage: str, done: int = done, b: int = b, robust: Tensor = robust, key: str = plan.key,
                           seconds: float = seconds) -> None:
                    if on_batch is not None:
                        seen = sum(int(robust[batches[c]].sum()) for c in mine if c < b)
                        on_batch(EvalProgress(key, stage, done, my_total, seen, seconds))

                robust_b, stage_b, bad, no_grad = _attack_batch(plan, crafter, model, x[s], y[s], robust[s].clone(),
                                                                seed, b, batch_size, notify)
                rec = {"robust": mask_to_str(robust_b), "invalid": bad, "no_gradient": no_grad,
                       "seconds": time.perf_counter() - t0, "stages": {k: mask_to_str(v) for k, v in stage_b.items()}}
                st.put(plan.key, b, rec)
            robust[s] = str_to_mask(rec["robust"], device)
            for name, text in rec.get("stages", {}).items():
                if name in stage_masks:
                    stage_masks[name][s] = str_to_mask(text, device)
            invalid += int(rec.get("invalid", 0))
            no_gradient += int(rec.get("no_gradient", 0))
            seconds += float(rec.get("seconds", 0.0))
            done += s.stop - s.start
            _report_progress(on_progress, on_batch, plan.key, "", done, my_total, robust, mine, batches, b, seconds,
                             resumed)
        if not mine:
            _report_progress(on_progress, on_batch, plan.key, "", 0, 0, robust, mine, batches, -1, 0.0, False)
        runs.append(AttackRun(plan.spec, plan.name, plan.params, robust, seconds, invalid, plan.threat, plan.access,
                              plan.loss, plan.transfer, plan.threat.within(primary), plan.resolved, stage_masks,
                              stage_access, no_gradient))

    # -- totals over ranks -----------------------------------------------------------------------
    if sh.active:
        masks = [clean] + [r.robust for r in runs] + [m for r in runs for m in r.stages.values()]
        summed = evalshard.all_sum(torch.stack(masks).to(torch.int64)) > 0
        clean = summed[0]
        for i, r in enumerate(runs):
            r.robust = summed[1 + i]
        k = 1 + len(runs)
        for r in runs:
            for name in r.stages:
                r.stages[name] = summed[k]
                k += 1
        scalars = evalshard.all_sum(torch.tensor([r.invalid for r in runs] + [r.no_gradient for r in runs]
                                                 + check_counts.tolist(), dtype=torch.long))
        for i, r in enumerate(runs):
            r.invalid = int(scalars[i])
            r.no_gradient = int(scalars[len(runs) + i])
        check_counts = scalars[2 * len(runs):]
        secs = evalshard.all_max(torch.tensor([r.seconds for r in runs] + [0.0], dtype=torch.float64))
        for i, r in enumerate(runs):
            r.seconds = float(secs[i])

    worst = clean.clone()
    for r in runs:
        if r.in_worst_case:
            worst &= r.robust
    accuracy: dict[str, float] = {"clean": _frac(clean)}
    for r in runs:
        accuracy[r.key] = _frac(r.robust)
    accuracy["worst_case"] = _frac(worst)
    names = ("random_forward", "probability_rows", "zero_gradient", "checked", "checked_correct")
    check_dict = {k: int(v) for k, v in zip(names, check_counts.tolist(), strict=True)} if checks else {}
    report = Report(n, accuracy, clean, worst, runs, seconds=time.perf_counter() - start, threat=primary, seed=seed,
                    batch_size=batch_size, checks=check_dict, world_size=sh.world,
                    resumed_batches=st.resumed_batches)
    report.flags = check_flags(check_dict) + compute_flags(report)
    return report


def _attack_batch(plan: _Plan, crafter, model, xb: Tensor, yb: Tensor, robust_b: Tensor, seed: int,  # noqa: ANN001
                  b: int, batch_size: int, notify: Callable[[str], None]) -> tuple[Tensor, dict[str, Tensor], int, int]:
    """Attack the still-robust points of one batch.

    Returns (robust mask, stage masks, invalid examples, points an attack could not differentiate).
    """
    _batch_seed(seed, b, plan.name)
    bad_total = 0
    no_grad = 0
    stage_b: dict[str, Tensor] = {}
    steps = plan.stages or [("", plan.attack)]
    for stage_name, attack in steps:
        idx = robust_b.nonzero().flatten()
        if idx.numel() and stage_name:
            notify(stage_name)
        if idx.numel():
            xs, ys = xb[idx], yb[idx]
            try:
                x_adv = attack(crafter, xs, ys)
            except ValueError as exc:  # the attack cannot run on this model/data (too few classes, ...)
                if isinstance(exc, UsageError):
                    raise
                where = f"{plan.name} ({stage_name})" if stage_name else plan.name
                raise UsageError(f"attack {where} cannot run: {exc}") from None
            except RuntimeError as exc:
                if not _no_input_gradient(exc):
                    raise
                # the output does not depend differentiably on the input: this gradient attack finds
                # nothing (counted as not fooled, reported and flagged)
                x_adv = xs.clone()
                no_grad += len(idx)
            if not isinstance(x_adv, Tensor) or x_adv.shape != xs.shape:
                got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
                raise PluginError(f"attack '{plan.name}' returned {got}, expected a tensor of shape {tuple(xs.shape)}")
            x_adv, bad = _check_examples(xs, x_adv.detach().to(device=xs.device, dtype=xs.dtype), plan.threat)
            bad_total += bad
            still = predict(model, x_adv, batch_size) == ys
            robust_b[idx[~still]] = False
        if stage_name:
            stage_b[stage_name] = robust_b.clone()
    return robust_b, stage_b, bad_total, no_grad


def _no_input_gradient(exc: RuntimeError) -> bool:
    text = str(exc)
    return "does not require grad" in text or "not have been used in the graph" in text


def _report_progress(on_progress, on_batch, key: str, stage: str, done: int, total: int, robust: Tensor,  # noqa: ANN001
                     mine: list[int], batches: list[slice], upto: int, seconds: float, resumed: bool) -> None:
    if on_progress is not None:
        on_progress(key, done, total)
    if on_batch is not None:
        seen = [batches[b] for b in mine if b <= upto]
        robust_seen = sum(int(robust[s].sum()) for s in seen)
        on_batch(EvalProgress(key, stage, done, total, robust_seen, seconds, resumed))
