"""Robustness evaluation: clean accuracy, each attack, and the per-sample worst case.

Every adversarial example is checked before it counts (:mod:`fsapp.engine.checks`: inside its
threat model's ball plus 1e-6 around the evaluator's private copy of the clean input, inside
[0, 1], finite; an invalid one is projected back and reported) and accuracy is recomputed with a
fresh eval-mode forward on the returned examples. A sample is robust only if no attack found a
misclassified point for it (attacks track their restarts and iterates). An output row that is not
finite is never a correct prediction (flag ``non-finite-output``).

How an evaluation runs:

- The samples are cut into batches of a fixed order; each (attack, batch) is seeded from
  ``(seed, batch index, attack name)``, so results do not depend on what ran before, on
  resuming, or on how batches are dealt to ``torchrun`` processes (``shard=True``). The seeding
  happens inside :func:`torch.random.fork_rng`: the caller's random streams are left exactly as
  they were (training can evaluate between steps without its numbers moving).
- Only the points still correctly classified are attacked. An attack that exposes ``stages``
  (``autoattack``) has its stages run by :func:`fsapp.adversary.cascade`, each on the points the
  previous ones left robust, and each stage's cumulative accuracy is reported.
- Attacks declare their threat model and kind as attributes (:class:`fsapp.adversary.Attack`,
  documented in :mod:`fsapp.hookspecs`). The worst case counts only attacks inside the report's
  threat model (``defaults["eps"]`` if given, else the largest Linf eps among the attacks).
- An attack gets copies of the inputs and labels, and runs with the models' modes and buffers
  saved and restored (:func:`fsapp.adversary.preserved_state`): it can neither move the centre
  of its ball nor change BatchNorm statistics of the model under evaluation.
- An attack that cannot differentiate the model (no gradient path to the input) finds nothing on
  those points; this is counted, reported and flagged (``zero-gradient``), not a crash. A plugin
  attack that raises is one line naming the attack and its plugin.
- Model checks run on the clean data (:func:`fsapp.engine.checks.model_checks`); they and the
  attack results feed the flags of :mod:`fsapp.engine.flags`.
- With ``state=PATH`` every finished batch is saved atomically; ``resume=True`` continues it.
- On the CPU, attacks craft on faster copies of a convolutional model (``layout="auto"``,
  :mod:`fsapp.engine.crafting`: channels-last for gradients, a frozen inference trace for
  forwards; the same function to float rounding); every example is still counted by the model
  itself. ``layout="keep"`` crafts on the model as given.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fsapp.adversary import ThreatModel, cascade, kind_of, predict, preserved_state, threat_of
from fsapp.engine.checks import CHECK_NAMES, check_examples, model_checks, validate_output
from fsapp.engine.crafting import crafting_model
from fsapp.engine.distributed import model_digest, tensor_digest
from fsapp.engine.evalstate import EvalState, mask_to_str, str_to_mask
from fsapp.engine.report import AttackRun, EvalProgress, Report, frac
from fsapp.errors import PluginError, UsageError
from fsapp.registry import apply_defaults, make_params, parse_spec

__all__ = ["SUITES", "AttackRun", "EvalProgress", "Report", "evaluate"]

SUITES: dict[str, tuple[str, ...]] = {
    "default": ("pgd:steps=20", "cw:steps=20"),
    "paper": ("fgsm:random_start=true", "pgd:steps=20", "pgd:steps=100", "cw:steps=20", "cw:steps=100"),
    "autoattack": ("autoattack",),
    "screen": ("screen",),
    "adaptive": ("autoattack", "adaptive"),
}
"""Named attack lists. ``default``: what an evaluation runs when no attack is named; ``paper``: the
paper's protocol (FGSM with a random start and step eps, PGD-20/100 and CW-20/100 with step eps/4
and a random start); ``autoattack``: the standard AutoAttack ensemble; ``screen``: the cheap tier
for every epoch (APGD-CE, then APGD-T on the 3 nearest boundaries in MALT order); ``adaptive``:
``autoattack``, then the escalations the flags and the model's declarations call for
(:mod:`fsapp.engine.adaptive`)."""

OnBatch = Callable[[EvalProgress], Any]


@dataclass
class _Plan:
    spec: str
    resolved: str
    name: str
    plugin: str
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

    @property
    def third_party(self) -> bool:
        from fsapp.plugins import BUILTIN_PLUGIN

        return self.plugin != BUILTIN_PLUGIN

    def what(self, stage: str = "") -> str:
        where = f"attack '{self.name}'" + (f" (stage {stage})" if stage else "")
        return where + (f" from plugin '{self.plugin}'" if self.third_party else "")


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
    return _Plan(spec, resolved, parsed.name, component.plugin, pdict, attack, threat, access, loss, transfer,
                 stages)


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
    on_progress: Callable[[str, int, int], Any] | None = None,
    defaults: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    source: torch.nn.Module | None = None,
    transfer: list[str] | tuple[str, ...] = (),
    state: str | Path | None = None,
    resume: bool = False,
    on_batch: OnBatch | None = None,
    checks: bool = True,
    shard: bool = False,
    fingerprint: dict[str, Any] | None = None,
    layout: str = "auto",
) -> Report:
    """Evaluate ``model`` on (x, y) against ``attacks`` (spec strings); see :class:`Report`.

    ``defaults`` (e.g. ``{"eps": 8/255, "step_size": 2/255}``) fill parameters that a spec does not
    name; the report still keys each attack by its spec as given. ``transfer`` specs are crafted
    on ``source`` and measured on ``model`` (keys ``transfer/<spec>``). ``seed`` seeds every
    (attack, batch); the caller's random state is left untouched. ``state``/``resume``: see the
    module docstring; ``shard``: deal batches to the ranks of an initialised process group.
    Progress goes to ``on_batch(EvalProgress)`` (``on_progress(key, done, total)`` is the same
    channel, shortened); an exception raised there stops the evaluation (finished batches stay in
    the state file). ``checks`` runs the model checks on the clean data; ``fingerprint`` adds items
    a resumed state must match. ``layout``: "auto" or "keep" (see the module docstring).
    """
    from fsapp.engine import distributed as ddp

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
    if layout not in ("auto", "keep"):
        raise UsageError(f"layout must be auto or keep, got {layout!r}")
    if transfer and source is None:
        raise UsageError("transfer attacks need a source model to craft them on")
    plans = [_plan(s, defaults, False) for s in attacks] + [_plan(s, defaults, True) for s in transfer]
    keys = [p.key for p in plans]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise UsageError(f"attack {dupes[0]!r} is listed twice")
    report_to = _progress_channel(on_batch, on_progress)
    sh = ddp.current() if shard else ddp.Shard()
    modules = [model] + ([source] if source is not None else [])
    modes = [(m, m.training) for mod in modules for m in mod.modules()]
    for mod in modules:
        mod.eval()
    cuda = [_cuda_index(device)] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            return _evaluate(model, source, x, y, plans, batch_size, report_to, defaults, seed, state, resume,
                             checks, sh, fingerprint, start, layout)
    finally:
        for m, training in modes:
            m.training = training


def _progress_channel(on_batch: OnBatch | None, on_progress: Callable[[str, int, int], Any] | None
                      ) -> OnBatch | None:
    if on_progress is None:
        return on_batch

    def both(p: EvalProgress) -> None:
        if not p.stage:
            on_progress(p.key, p.done, p.total)
        if on_batch is not None:
            on_batch(p)

    return both


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _seed_batch(seed: int, batch: int, name: str, device: torch.device) -> None:
    """Seed the default generator (and the evaluation device's) for one (attack, batch)."""
    value = zlib.crc32(f"{seed}/{batch}/{name}".encode()) & 0x7FFFFFFF
    torch.random.default_generator.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.default_generators[_cuda_index(device)].manual_seed(value)


@dataclass
class _Pass:
    """What every part of one evaluation shares: the data, this process's batches, the state file."""

    model: torch.nn.Module
    source: torch.nn.Module | None
    x: Tensor
    y: Tensor
    batches: list[slice]
    mine: list[int]
    state: Any
    seed: int
    batch_size: int
    on_batch: OnBatch | None
    crafters: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.batches[b].stop - self.batches[b].start for b in self.mine)


def _evaluate(model, source, x, y, plans, batch_size, on_batch, defaults, seed, state_path,  # noqa: ANN001
              resume, checks, sh, fingerprint, start, layout="auto") -> Report:
    from fsapp.engine.flags import check_flags, compute_flags

    n = len(y)
    batches = [slice(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    primary = _primary_threat(plans, defaults)
    fp: dict[str, Any] = {}
    if state_path is not None:
        fp = {"n": n, "batch_size": batch_size, "seed": seed, "attacks": [p.resolved for p in plans],
              "transfer": [p.transfer for p in plans], "checks": checks, "rank": sh.rank, "world": sh.world,
              "data": tensor_digest(x, y), "model": model_digest(model),
              "source": model_digest(source) if source is not None else None, **(fingerprint or {})}
    job = _Pass(model, source, x, y, batches, [b for b in range(len(batches)) if sh.owns(b)],
                EvalState.open(state_path, fp, resume), seed, batch_size, on_batch)
    if plans:
        probe = x[:16]
        job.crafters["model"] = crafting_model(model, probe, layout)
        if source is not None and any(p.transfer for p in plans):
            job.crafters["source"] = crafting_model(source, probe, layout)

    clean, counts = _clean_pass(job, checks)
    runs: list[AttackRun] = []
    for plan in plans:
        if getattr(plan.attack, "adaptive", False):
            runs.append(_adaptive_pass(job, plan, clean, primary, runs, counts, checks))
        else:
            runs.append(_attack_pass(job, plan, clean, primary))
    if sh.active:
        clean, counts = _sum_over_ranks(clean, runs, counts)

    worst = clean.clone()
    for r in runs:
        if r.in_worst_case:
            worst &= r.robust
    accuracy: dict[str, float] = {"clean": frac(clean)}
    for r in runs:
        accuracy[r.key] = frac(r.robust)
    accuracy["worst_case"] = frac(worst)
    totals = [int(v) for v in counts.tolist()]
    check_dict = dict(zip(CHECK_NAMES, totals, strict=False)) if checks else {}
    report = Report(n, accuracy, clean, worst, runs, seconds=time.perf_counter() - start, threat=primary, seed=seed,
                    batch_size=batch_size, checks={**check_dict, "non_finite": totals[-1]}, world_size=sh.world,
                    resumed_batches=job.state.resumed_batches)
    report.flags = check_flags(report.checks) + compute_flags(report)
    return report


def _clean_pass(job: _Pass, checks: bool) -> tuple[Tensor, Tensor]:
    """Clean accuracy (a non-finite row is never correct) and the model-check counts of this
    process's batches; returns (clean mask, counts of CHECK_NAMES plus non-finite outputs)."""

    x, y, model = job.x, job.y, job.model
    clean = torch.zeros(len(y), dtype=torch.bool, device=x.device)
    counts = torch.zeros(len(CHECK_NAMES) + 1, dtype=torch.long)
    for b in job.mine:
        s = job.batches[b]
        rec = job.state.get("clean", b)
        if rec is None:
            with torch.no_grad():
                logits = model(x[s])
            finite = torch.isfinite(logits).all(1)
            ok = (logits.argmax(1) == y[s]) & finite
            rec = {"clean": mask_to_str(ok), "checks": model_checks(model, x[s], y[s], ok, logits) if checks else {},
                   "non_finite": int((~finite).sum())}
            job.state.put("clean", b, rec)
        clean[s] = str_to_mask(rec["clean"], x.device)
        c = rec.get("checks") or {}
        counts += torch.tensor([c.get(k, 0) for k in CHECK_NAMES] + [int(rec.get("non_finite", 0))])
    return clean, counts


def _adaptive_pass(job: _Pass, plan: _Plan, clean: Tensor, primary: ThreatModel | None, runs: list[AttackRun],
                   counts: Tensor, checks: bool) -> AttackRun:
    """The ``adaptive`` attack: escalations chosen from the flags the runs so far raise and from what
    the model declares (:mod:`fsapp.engine.adaptive`), run on the points every earlier attack in the
    worst case left robust; each escalation's reason goes into the run."""
    from fsapp.engine.adaptive import escalations, square_helped
    from fsapp.engine.flags import check_flags, compute_flags

    start = clean.clone()
    for r in runs:
        if r.in_worst_case:
            start &= r.robust
    provisional = Report(len(job.y), {"clean": frac(clean), **{r.key: frac(r.robust) for r in runs},
                                      "worst_case": frac(start)}, clean, start, list(runs))
    check_dict = dict(zip(CHECK_NAMES, [int(v) for v in counts.tolist()], strict=False)) if checks else {}
    fired = [f["id"] for f in check_flags(check_dict) + compute_flags(provisional)]
    mine = torch.cat([torch.arange(job.batches[b].start, job.batches[b].stop, device=job.x.device) for b in job.mine])
    chosen = escalations(plan.attack.p, job.model, job.source, fired, square_helped(runs), job.x[mine], job.y[mine])
    plan.stages = [(e.name, e.attack) for e in chosen]
    run = _attack_pass(job, plan, clean, primary, start)
    run.notes = {e.name: e.reason for e in chosen}
    return run


def _attack_pass(job: _Pass, plan: _Plan, clean: Tensor, primary: ThreatModel | None,
                 start: Tensor | None = None) -> AttackRun:
    """One attack over this process's batches (each seeded from its index, resumed ones read back),
    on the points of ``start`` (default: the clean-correct ones)."""

    device = job.x.device
    crafter = job.crafters["source" if plan.transfer else "model"]
    first = clean if start is None else start
    robust = first.clone()
    stage_masks = {name: first.clone() for name, _ in plan.stages}
    stage_access = {name: kind_of(a, name)[0] for name, a in plan.stages}
    stage_seconds = {name: 0.0 for name, _ in plan.stages}
    tally = {"invalid": 0, "no_gradient": 0, "non_finite": 0}
    seconds, done, total = 0.0, 0, job.total

    def progress(stage: str, done: int, upto: int, seconds: float, resumed: bool = False) -> None:
        if job.on_batch is not None:
            seen = sum(int(robust[job.batches[c]].sum()) for c in job.mine if c <= upto)
            job.on_batch(EvalProgress(plan.key, stage, done, total, seen, seconds, resumed))

    progress("", 0, -1, 0.0)
    for b in job.mine:
        s = job.batches[b]
        rec = job.state.get(plan.key, b)
        resumed = rec is not None
        if rec is None:
            t0 = time.perf_counter()
            _seed_batch(job.seed, b, plan.name, device)

            def notify(stage: str, done: int = done, b: int = b, seconds: float = seconds) -> None:
                progress(stage, done, b - 1, seconds)

            robust_b, stage_b, found, stage_t = _attack_batch(plan, crafter, job.model, job.x[s], job.y[s],
                                                              robust[s].clone(), job.batch_size, notify)
            rec = {"robust": mask_to_str(robust_b), **found, "seconds": time.perf_counter() - t0,
                   "stages": {k: mask_to_str(v) for k, v in stage_b.items()}, "stage_seconds": stage_t}
            job.state.put(plan.key, b, rec)
        robust[s] = str_to_mask(rec["robust"], device)
        for name, text in rec.get("stages", {}).items():
            if name in stage_masks:
                stage_masks[name][s] = str_to_mask(text, device)
        for k in tally:
            tally[k] += int(rec.get(k, 0))
        for name, sec in (rec.get("stage_seconds") or {}).items():
            if name in stage_seconds:
                stage_seconds[name] += float(sec)
        seconds += float(rec.get("seconds", 0.0))
        done += s.stop - s.start
        progress("", done, b, seconds, resumed)
    return AttackRun(plan.spec, plan.name, plan.params, robust, seconds, tally["invalid"], plan.threat, plan.access,
                     plan.loss, plan.transfer, plan.threat.within(primary), plan.resolved, stage_masks, stage_access,
                     tally["no_gradient"], tally["non_finite"], stage_seconds)


def _sum_over_ranks(clean: Tensor, runs: list[AttackRun], counts: Tensor) -> tuple[Tensor, Tensor]:
    """Totals over the ranks of a sharded evaluation: masks OR-ed, counts summed, seconds maxed."""
    from fsapp.engine import distributed as ddp

    masks = [clean] + [r.robust for r in runs] + [m for r in runs for m in r.stages.values()]
    summed = ddp.all_sum(torch.stack(masks).to(torch.int64)) > 0
    clean = summed[0]
    for i, r in enumerate(runs):
        r.robust = summed[1 + i]
    k = 1 + len(runs)
    for r in runs:
        for name in r.stages:
            r.stages[name] = summed[k]
            k += 1
    per_run = [r.invalid for r in runs] + [r.no_gradient for r in runs] + [r.non_finite for r in runs]
    scalars = ddp.all_sum(torch.tensor(per_run + counts.tolist(), dtype=torch.long))
    m = len(runs)
    for i, r in enumerate(runs):
        r.invalid, r.no_gradient, r.non_finite = int(scalars[i]), int(scalars[m + i]), int(scalars[2 * m + i])
    secs = ddp.all_max(torch.tensor([r.seconds for r in runs] + [t for r in runs for t in r.stage_seconds.values()]
                                    + [0.0], dtype=torch.float64))
    k = len(runs)
    for i, r in enumerate(runs):
        r.seconds = float(secs[i])
        for name in r.stage_seconds:
            r.stage_seconds[name] = float(secs[k])
            k += 1
    return clean, scalars[3 * m:]


def _attack_batch(plan: _Plan, crafter, model, xb: Tensor, yb: Tensor, robust_b: Tensor,  # noqa: ANN001
                  batch_size: int, notify: Callable[[str], None]
                  ) -> tuple[Tensor, dict[str, Tensor], dict[str, int], dict[str, float]]:
    """Attack the still-robust points of one batch (every stage of a staged attack in turn).

    Returns (robust mask, stage masks, counts: invalid examples, points an attack could not
    differentiate, examples with a non-finite output; seconds per stage: from the end of the
    previous stage to the end of this one, checks and the fresh forward included).
    """
    found = {"invalid": 0, "no_gradient": 0, "non_finite": 0}
    stage_b: dict[str, Tensor] = {}
    stage_t: dict[str, float] = {}
    clock = [time.perf_counter()]

    def labels(x_adv: Tensor) -> Tensor:
        pred = predict(model, x_adv, batch_size)
        found["non_finite"] += int((pred < 0).sum())
        return pred

    def guarded(stage: str, attack: Any) -> Callable[[Any, Tensor, Tensor], Tensor]:
        def run(net: torch.nn.Module, xs: Tensor, ys: Tensor) -> Tensor:
            if stage:
                notify(stage)
            x_adv = _call_attack(plan, stage, attack, net, model, xs, ys, found)
            x_adv, bad = check_examples(xs, validate_output(x_adv, xs, plan.what(stage)), plan.threat)
            found["invalid"] += bad
            return x_adv
        return run

    def record(stage: str, mask: Tensor) -> None:
        now = time.perf_counter()
        if stage:
            stage_b[stage] = mask.clone()
            stage_t[stage] = now - clock[0]
        clock[0] = now

    steps = plan.stages or [("", plan.attack)]
    _, robust_b = cascade(crafter, xb, yb, [(name, guarded(name, a)) for name, a in steps], robust=robust_b,
                          labels=labels, on_stage=record)
    return robust_b, stage_b, found, stage_t


def _call_attack(plan: _Plan, stage: str, attack: Any, net: torch.nn.Module, model: torch.nn.Module, xs: Tensor,
                 ys: Tensor, found: dict[str, int]) -> Any:
    """One attack call on copies of ``xs`` and ``ys`` (the evaluator's stay private: the centre of the
    ball cannot move) with the models' modes and buffers preserved; errors become one line."""
    try:
        with preserved_state(net, model if model is not net else None):
            return attack(net, xs.clone(), ys.clone())
    except (UsageError, KeyboardInterrupt):
        raise
    except ValueError as exc:  # the attack cannot run on this model/data (too few classes, ...)
        where = f"{plan.name} ({stage})" if stage else plan.name
        raise UsageError(str(exc) if isinstance(exc, PluginError) else f"attack {where} cannot run: {exc}") from None
    except RuntimeError as exc:
        if _no_input_gradient(exc):
            # the output does not depend differentiably on the input: this gradient attack finds
            # nothing (counted as not fooled, reported and flagged)
            found["no_gradient"] += len(xs)
            return xs
        if plan.third_party and not isinstance(exc, PluginError):
            raise PluginError(f"{plan.what(stage)} failed: {type(exc).__name__}: {exc}") from exc
        raise
    except PluginError:
        raise
    except (Exception, SystemExit) as exc:
        if not plan.third_party:
            raise
        raise PluginError(f"{plan.what(stage)} failed: {type(exc).__name__}: {exc}") from exc


def _no_input_gradient(exc: RuntimeError) -> bool:
    text = str(exc)
    return "does not require grad" in text or "not have been used in the graph" in text
