"""Evaluation figures of ``fsapp bench``: fsapp's PGD against torchattacks' PGD, AutoAttack, and the
throughput of one attack on a synthetic batch (:func:`time_attack`, used by ``benchmarks/gpu_bench.py``).

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


def eval_bench(device: str = "auto", repeats: int = 3, autoattack_n: int = 100, progress: Any = None,
               autoattack: bool = True) -> dict[str, Any]:
    """Images per second and robust accuracy of fsapp's PGD, torchattacks' PGD and ``autoattack``."""
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
    with torch.no_grad():
        out["clean_accuracy"] = float((model(x).argmax(1) == y).float().mean())
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
        out["note"] = "torchattacks is not installed (pip install torchattacks): no comparison"
    fs_attack = get_registry().create("attack", f"pgd:steps={STEPS},eps={EPS},step_size={STEP}")

    def fs_raw() -> float:
        adv = fs_attack(model, x, y)
        with torch.no_grad():
            return float((model(adv).argmax(1) == y).float().mean())

    def fs_eval() -> float:
        r = evaluate(model, x, y, [f"pgd:steps={STEPS}"], batch_size=n, defaults={"eps": EPS, "step_size": STEP},
                     seed=0, checks=False)
        return r.accuracy[f"pgd:steps={STEPS}"]

    def ta_raw() -> float:
        adv = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)(x, y)
        with torch.no_grad():
            return float((model(adv).argmax(1) == y).float().mean())

    cases = {"fsapp_pgd_attack": fs_raw, "fsapp_pgd_evaluate": fs_eval}
    if torchattacks is not None:
        cases["torchattacks_pgd"] = ta_raw
    times: dict[str, list[float]] = {k: [] for k in cases}
    accs: dict[str, list[float]] = {k: [] for k in cases}
    say(f"timing PGD-{STEPS} on {n} digits images ({repeats} interleaved repeats) ...")
    for rep in range(repeats + 1):
        for name, fn in cases.items():
            torch.manual_seed(1000 + rep)  # the same random start for both raw attacks
            result: list[float] = []
            sec = seconds(lambda fn=fn, result=result: result.append(fn()), dev)
            if rep > 0:
                times[name].append(sec)
                accs[name].append(result[0])
    pgd: dict[str, Any] = {}
    for name in cases:
        sec = statistics.median(times[name])
        pgd[name] = {"seconds": sec, "images_per_sec": n / sec, "robust_accuracy": max(accs[name]),
                     "robust_accuracy_runs": accs[name]}
    if torchattacks is not None:
        ta = pgd["torchattacks_pgd"]
        raw, full = pgd["fsapp_pgd_attack"], pgd["fsapp_pgd_evaluate"]
        pgd["speedup_attack"] = raw["images_per_sec"] / ta["images_per_sec"]
        pgd["speedup_evaluate"] = full["images_per_sec"] / ta["images_per_sec"]
        pgd["at_least_as_fast"] = max(raw["images_per_sec"], full["images_per_sec"]) >= ta["images_per_sec"]
        pgd["at_least_as_strong"] = all(a <= b + 1e-12 for a, b in zip(raw["robust_accuracy_runs"],
                                                                     ta["robust_accuracy_runs"], strict=True))
    out["pgd"] = pgd
    if autoattack:
        k = min(autoattack_n, n)
        say(f"timing the standard AutoAttack on {k} images ...")
        runs: list[Any] = []
        sec = seconds(lambda: runs.append(evaluate(model, x[:k], y[:k], ["autoattack"], batch_size=k,
                                                   defaults={"eps": EPS}, seed=0, checks=False)), dev)
        r = runs[0]
        same = evaluate(model, x[:k], y[:k], [f"pgd:steps={STEPS}"], batch_size=k,
                        defaults={"eps": EPS, "step_size": STEP}, seed=0, checks=False)
        out["autoattack"] = {"n": k, "seconds": sec, "images_per_sec": k / sec,
                             "robust_accuracy": r.accuracy["autoattack"],
                             "stages": r.stage_accuracy(r.attacks[0]),
                             "pgd_robust_accuracy_same_images": same.accuracy[f"pgd:steps={STEPS}"]}
    return out


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
