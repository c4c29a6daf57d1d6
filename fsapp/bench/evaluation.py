"""Evaluation figures of ``fsapp bench``: fsapp's PGD and CW against torchattacks' loops, AutoAttack
and the ``screen`` tier against the reference AutoAttack, and the throughput of one attack on a
synthetic batch (:func:`time_attack`, used by ``benchmarks/gpu_bench.py``).

Everything runs on the same model and the same data: a small CNN trained for a few seconds on
the embedded digits (so robust accuracy is neither 0 nor 100%). Two figures per PGD:

- the attack alone, ``attack(model, x, y)`` on the whole batch, fsapp ``pgd:steps=20`` vs
  ``torchattacks.PGD(steps=20)`` with the same eps, step and random start, then one forward;
- the whole evaluation, :func:`fsapp.engine.evaluate.evaluate` (checks, fresh forward, per-sample
  worst case, only correctly classified points attacked) vs torchattacks plus a forward.

Repetitions are interleaved and medians reported; on the CPU the clock is this process's CPU
time (other load on the machine does not count), on CUDA the wall clock between syncs. fsapp's
PGD must be at least as fast and at least as strong: it tracks every iterate, so with the same
random start its robust accuracy can never be above torchattacks'. Then the standard
``autoattack`` on a subset, images per second.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import torch

from fsapp.bench.timing import measure, seconds
from fsapp.bench.train import Variant, build_model, synthetic_batch

EPS = 0.1
STEP = 0.025
STEPS = 20


def bench_model(device: torch.device, epochs: int = 4, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor,
                                                                                torch.Tensor]:
    """A small CNN trained (cross-entropy, no adversary) on the digits; returns (model, x_test, y_test)."""
    import torch.nn.functional as F

    from fsapp.data import to_unit
    from fsapp.plugins import get_registry

    reg = get_registry()
    data = reg.create("dataset", "digits")
    c, h, _ = data.shape
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = reg.create("model", "small-cnn:width=16,hidden=64", num_classes=data.num_classes, channels=c, size=h,
                           mean=tuple(data.mean), std=tuple(data.std)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x, y = to_unit(data.x_train).to(device), data.y_train.to(device)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), device=device)
            for i in range(0, len(y), 60):
                idx = order[i:i + 60]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval()
    return model, to_unit(data.x_test).to(device), data.y_test.to(device)


def reference_autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                         seed: int = 0) -> torch.Tensor:
    """The reference AutoAttack, standard version, from torchattacks' ports of the reference's
    components at the reference settings (APGD-CE 100 steps, APGD-T 9 targets x 100 steps, FAB-T 9
    targets x 100 steps, Square 5000 queries), each on the points still robust; the per-sample
    robust mask. (``torchattacks.AutoAttack`` itself leaves APGD, APGD-T and FAB at torchattacks'
    default of 10 steps, which is not the standard protocol.)"""
    import torchattacks

    attacks = [
        torchattacks.APGD(model, eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed),
        torchattacks.APGDT(model, eps=eps, steps=100, n_restarts=1, n_classes=10, seed=seed),
        torchattacks.FAB(model, eps=eps, steps=100, multi_targeted=True, n_classes=10, n_restarts=1, seed=seed),
        torchattacks.Square(model, eps=eps, n_queries=5000, n_restarts=1, seed=seed, resc_schedule=False),
    ]
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    for attack in attacks:
        idx = robust.nonzero().flatten()
        if idx.numel() == 0:
            break
        adv = attack(x[idx], y[idx])
        with torch.no_grad():
            robust[idx] &= model(adv).argmax(1) == y[idx]
    return robust


def reference_cw(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                 steps: int) -> torch.Tensor:
    """torchattacks' PGD loop (random start, signed steps, clip) with the CW margin loss (kappa 50):
    the reference for fsapp's ``cw`` (torchattacks has no L-inf CW)."""
    from fsapp.losses import cw_margin_loss

    images, adv = x.clone().detach(), x.clone().detach()
    adv = torch.clamp(adv + torch.empty_like(adv).uniform_(-eps, eps), min=0, max=1).detach()
    for _ in range(steps):
        adv.requires_grad = True
        cost = cw_margin_loss(model(adv), y)
        grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
        adv = adv.detach() + alpha * grad.sign()
        delta = torch.clamp(adv - images, min=-eps, max=eps)
        adv = torch.clamp(images + delta, min=0, max=1).detach()
    return adv


def _interleaved(cases: dict[str, Any], repeats: int, dev: torch.device, warmup: bool = True
                 ) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Each case called once per round, rounds interleaved (a warm-up round not counted)."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    results: dict[str, list[Any]] = {k: [] for k in cases}
    for rep in range(repeats + (1 if warmup else 0)):
        for name, fn in cases.items():
            torch.manual_seed(1000 + rep)  # the same random start for the raw attacks of a round
            out: list[Any] = []
            sec = seconds(lambda fn=fn, out=out: out.append(fn()), dev)
            if rep > 0 or not warmup:
                times[name].append(sec)
                results[name].append(out[0])
    return times, results


def _accuracy(model: torch.nn.Module, adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(adv).argmax(1) == y).float().mean())


def eval_bench(device: str = "auto", repeats: int = 3, autoattack_n: int = 100, progress: Any = None,
               autoattack: bool = True, autoattack_repeats: int = 1) -> dict[str, Any]:
    """Speed and strength of fsapp's PGD and CW against torchattacks' loops, and of ``autoattack``
    and ``screen`` against the reference AutoAttack (see :func:`reference_autoattack`), all on the
    same model and data, repetitions interleaved in this process."""
    from fsapp.engine.distributed import pick_device
    from fsapp.engine.evaluate import evaluate
    from fsapp.plugins import get_registry

    dev = pick_device(device)
    say = progress.print if progress is not None else (lambda *_: None)
    say("evaluation bench: training a small CNN on the digits ...")
    model, x, y = bench_model(dev)
    n = len(y)
    out: dict[str, Any] = {"device": str(dev), "model": "small-cnn:width=16,hidden=64 (digits, 4 epochs CE)",
                           "n": n, "eps": EPS, "step_size": STEP, "steps": STEPS, "repeats": repeats,
                           "clock": "wall (synchronised)" if dev.type == "cuda" else "process CPU time",
                           "threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        out["load_average"] = list(os.getloadavg())
    with torch.no_grad():
        out["clean_accuracy"] = float((model(x).argmax(1) == y).float().mean())
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
        out["note"] = "torchattacks is not installed (pip install torchattacks): no comparison"
    reg = get_registry()
    defaults = {"eps": EPS, "step_size": STEP}
    cases: dict[str, Any] = {}
    for name in ("pgd", "cw"):
        attack = reg.create("attack", f"{name}:steps={STEPS},eps={EPS},step_size={STEP}")
        cases[f"fsapp_{name}_attack"] = lambda attack=attack: _accuracy(model, attack(model, x, y), y)
        cases[f"fsapp_{name}_evaluate"] = lambda name=name: evaluate(
            model, x, y, [f"{name}:steps={STEPS}"], batch_size=n, defaults=defaults, seed=0,
            checks=False).accuracy[f"{name}:steps={STEPS}"]
    if torchattacks is not None:
        cases["torchattacks_pgd"] = lambda: _accuracy(
            model, torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)(x, y), y)
        cases["torchattacks_cw"] = lambda: _accuracy(model, reference_cw(model, x, y, EPS, STEP, STEPS), y)
    say(f"timing PGD-{STEPS} and CW-{STEPS} on {n} digits images ({repeats} interleaved repeats) ...")
    times, accs = _interleaved(cases, repeats, dev)
    for name in ("pgd", "cw"):
        figures: dict[str, Any] = {}
        for case in cases:
            if case.endswith(f"_{name}") or f"_{name}_" in case:
                sec = statistics.median(times[case])
                figures[case] = {"seconds": sec, "images_per_sec": n / sec, "robust_accuracy": max(accs[case]),
                                 "robust_accuracy_runs": accs[case]}
        ref = figures.get(f"torchattacks_{name}")
        if ref is not None:
            raw, full = figures[f"fsapp_{name}_attack"], figures[f"fsapp_{name}_evaluate"]
            figures["speedup_attack"] = raw["images_per_sec"] / ref["images_per_sec"]
            figures["speedup_evaluate"] = full["images_per_sec"] / ref["images_per_sec"]
            figures["at_least_as_fast"] = max(raw["images_per_sec"], full["images_per_sec"]) >= ref["images_per_sec"]
            figures["at_least_as_strong"] = all(a <= b + 1e-12 for a, b in zip(raw["robust_accuracy_runs"],
                                                                             ref["robust_accuracy_runs"], strict=True))
        out[name] = figures
    if autoattack:
        out["autoattack"] = _autoattack_bench(model, x, y, min(autoattack_n, n), autoattack_repeats, dev, say,
                                              torchattacks is not None)
    return out


def _autoattack_bench(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, repeats: int,
                      dev: torch.device, say: Any, reference: bool) -> dict[str, Any]:
    """``autoattack`` (and ``screen``) through the evaluator against the reference, interleaved."""
    from fsapp.engine.evaluate import evaluate

    xs, ys = x[:k], y[:k]
    say(f"timing the standard AutoAttack{' against the reference' if reference else ''} on {k} images ...")
    cases: dict[str, Any] = {
        "fsapp": lambda: evaluate(model, xs, ys, ["autoattack"], batch_size=k, defaults={"eps": EPS}, seed=0,
                                  checks=False),
        "screen": lambda: evaluate(model, xs, ys, ["screen"], batch_size=k, defaults={"eps": EPS}, seed=0,
                                   checks=False),
    }
    if reference:
        cases["reference"] = lambda: reference_autoattack(model, xs, ys, EPS)
    times, results = _interleaved(cases, repeats, dev, warmup=False)
    full = results["fsapp"][0]
    run = full.attacks[0]
    sec = statistics.median(times["fsapp"])
    figures: dict[str, Any] = {
        "n": k, "seconds": sec, "images_per_sec": k / sec, "seconds_runs": times["fsapp"],
        "robust_accuracy": full.accuracy["autoattack"], "stages": full.stage_accuracy(run),
        "stage_seconds": dict(run.stage_seconds),
    }
    screen = results["screen"][0].attacks[0]
    figures["screen"] = {"seconds": statistics.median(times["screen"]), "seconds_runs": times["screen"],
                         "robust_accuracy": screen.robust.float().mean().item(),
                         "agreement": float((screen.robust == run.robust).float().mean()),
                         "speedup": sec / statistics.median(times["screen"])}
    if reference:
        ref_robust = results["reference"][0].to(run.robust.device)
        ref_sec = statistics.median(times["reference"])
        figures["reference"] = {"seconds": ref_sec, "images_per_sec": k / ref_sec, "seconds_runs": times["reference"],
                                "robust_accuracy": float(ref_robust.float().mean()),
                                "implementation": "torchattacks APGD/APGDT/FAB/Square at the standard settings"}
        figures["speedup"] = ref_sec / sec
        figures["more_robust_than_reference"] = int((run.robust & ~ref_robust).sum())
        figures["less_robust_than_reference"] = int((~run.robust & ref_robust).sum())
        figures["same_per_sample"] = bool(torch.equal(run.robust, ref_robust))
    return figures


def time_attack(
    model_spec: str, attack: str = "pgd:steps=20,eps=8/255,step_size=2/255", batch_size: int = 500,
    repeats: int = 3, device: torch.device | None = None, shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10, variant: Variant = Variant(),
) -> dict[str, Any]:
    """Evaluation throughput: images/s of crafting ``attack`` (eval mode) and classifying the result."""
    from fsapp.engine.step import autocast
    from fsapp.plugins import get_registry

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model, net = build_model(model_spec, device, variant, shape, num_classes)
    model.eval()
    attacker = get_registry().create("attack", attack)
    x, y = synthetic_batch(batch_size, shape, num_classes, device, variant.channels_last)

    def once() -> None:
        with autocast(device, variant.precision):
            x_adv = attacker(net, x, y)
            with torch.no_grad():
                net(x_adv).argmax(1)

    times = []
    for rep in range(repeats + 1):
        wall, _ = measure(once, device)
        if rep:
            times.append(wall)
    med = statistics.median(times)
    return {"attack": attack, "variant": variant.label, "batch_size": batch_size, "seconds_per_batch": med,
            "images_per_s": batch_size / med}
