"""``fsapp bench``: training-step cost of standard, Madry and Feature Scattering, as ratios.

Every method runs on the same model and the same batch; repetitions are interleaved
(standard, madry, feature-scatter, standard, ...) and the median of each is reported, so the
ratios are measured in one run under the same machine load (the minimum is reported too: on a
shared machine it is the least disturbed estimate).

A second table shows the effect of the execution options on standard and Feature Scattering
steps: precision (fp32, bf16), memory layout (contiguous, channels-last) and, on request,
``torch.compile``; with the peak memory of each step (CUDA: ``max_memory_allocated`` above the
memory held before the step; CPU: the peak of the bytes that tensors allocated during the step,
from the profiler's memory events).

The functions here are also the building blocks of ``benchmarks/gpu_bench.py``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fsapp.engine.step import training_step

DEFAULT_MODELS = ("small-cnn", "wrn:depth=16,widen=4")
METHODS = {
    "standard": ("none", 0.0),
    "madry": ("supervised:epsilon=8/255,step_size=2/255,steps=7", 0.0),
    "feature-scatter": ("feature-scatter:epsilon=8/255,step_size=8/255,steps=1", 0.5),
}
VARIANT_METHODS = ("standard", "feature-scatter")


@dataclass(frozen=True)
class Variant:
    """Execution options of one row: precision, memory layout, compilation."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def label(self) -> str:
        parts = [self.precision] + (["channels_last"] if self.channels_last else []) + (
            ["compile"] if self.compile else [])
        return "+".join(parts)

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """``fp32``, ``bf16+cl``, ``bf16+channels_last+compile``, ... (``cl`` = channels_last)."""
        parts = [p.strip() for p in text.split("+") if p.strip()]
        if not parts or parts[0] not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"bad variant {text!r}: start with fp32, bf16 or fp16 (e.g. bf16+cl+compile)")
        extra = set(parts[1:])
        unknown = extra - {"cl", "channels_last", "compile"}
        if unknown:
            raise ValueError(f"bad variant {text!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                             "use cl (channels_last) and compile")
        return cls(parts[0], bool(extra & {"cl", "channels_last"}), "compile" in extra)


DEFAULT_VARIANTS = (Variant("fp32"), Variant("fp32", True), Variant("bf16"), Variant("bf16", True))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(batch_size: int, shape: tuple[int, int, int], num_classes: int,
                    device: torch.device, channels_last: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch in [0, 1] (CIFAR-shaped by default) and labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch_size, *shape), generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def build_model(model_spec: str, device: torch.device, variant: Variant = Variant(),
                shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> tuple[Any, Any]:
    """``(model, net)``: the model on ``device`` in the variant's layout, and what runs it
    (the model itself, or its ``torch.compile``)."""
    from fsapp.plugins import get_registry

    model = get_registry().create("model", model_spec, num_classes=num_classes, channels=shape[0],
                                  size=shape[1], mean=(0.5,) * shape[0], std=(0.25,) * shape[0]).to(device)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if variant.compile else model
    return model, net


@dataclass
class _Setup:
    net: Any
    model: Any
    perturb: Callable[..., torch.Tensor]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    smoothing: float
    precision: str
    x: torch.Tensor
    y: torch.Tensor

    def step(self) -> None:
        """One training step, checked for a non-finite loss the way the loop does on this device:
        with a host read on the CPU (free there), on the device elsewhere."""
        training_step(self.net, self.perturb, self.optimizer, self.scaler, self.x, self.y, self.smoothing,
                      self.precision, sync=self.x.device.type == "cpu")


def _setup(model_spec: str, method: str, variant: Variant, batch_size: int, device: torch.device,
           shape: tuple[int, int, int], num_classes: int) -> _Setup:
    from fsapp.plugins import get_registry

    torch.manual_seed(0)
    model, net = build_model(model_spec, device, variant, shape, num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=variant.precision == "fp16")
    spec, smoothing = METHODS[method]
    x, y = synthetic_batch(batch_size, shape, num_classes, device, variant.channels_last)
    perturb = get_registry().create("perturbation", spec)
    return _Setup(net, model, perturb, opt, scaler, smoothing, variant.precision, x, y)


def _interleaved(setups: dict[Any, _Setup], repeats: int, device: torch.device, warmup: int = 1,
                 cpu_times: dict[Any, list[float]] | None = None) -> dict[Any, list[float]]:
    """Wall seconds per step of each setup, repetitions interleaved across setups; the process's
    CPU seconds per step go to ``cpu_times`` when given."""
    times: dict[Any, list[float]] = {k: [] for k in setups}
    for rep in range(repeats + warmup):
        for key, s in setups.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            s.step()
            _sync(device)
            if rep >= warmup:
                times[key].append(time.perf_counter() - t0)
                if cpu_times is not None:
                    cpu_times.setdefault(key, []).append(time.process_time() - c0)
    return times


def time_train_steps(
    model_spec: str, batch_size: int, repeats: int, device: torch.device, precision: str = "fp32",
    shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
    methods: Iterable[str] = tuple(METHODS), channels_last: bool = False, compile: bool = False,
) -> dict[str, Any]:
    """Median seconds per training step of each method, interleaved; ``min`` holds the minima and,
    on the CPU, ``cpu`` the medians of the process's CPU seconds per step (time spent waiting for
    a core on a shared machine is not in them)."""
    variant = Variant(precision, channels_last, compile)
    setups = {m: _setup(model_spec, m, variant, batch_size, device, shape, num_classes) for m in methods}
    cpu: dict[Any, list[float]] = {}
    times = _interleaved(setups, repeats, device, cpu_times=cpu)
    out: dict[str, Any] = {m: statistics.median(t) for m, t in times.items()}
    out["min"] = {m: min(t) for m, t in times.items()}
    if device.type == "cpu":
        out["cpu"] = {m: statistics.median(t) for m, t in cpu.items()}
    return out


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines on file descriptor 2 (restored on exit)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(run_step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``run_step`` above what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_step()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        if e.device_type().name == "CPU":
            level += e.nbytes()
            peak = max(peak, level)
    return int(peak)


def time_variants(
    model_spec: str, variants: Iterable[Variant], batch_size: int, repeats: int, device: torch.device,
    shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
    methods: Iterable[str] = VARIANT_METHODS, memory: bool = True,
) -> list[dict[str, Any]]:
    """One row per variant: median step time, images/s and peak memory of each method, and the
    Feature Scattering / standard ratio. All (variant, method) pairs are interleaved."""
    variants = list(variants)
    methods = list(methods)
    setups = {(v, m): _setup(model_spec, m, v, batch_size, device, shape, num_classes)
              for v in variants for m in methods}
    times = _interleaved(setups, repeats, device)
    rows = []
    for v in variants:
        row: dict[str, Any] = {"variant": v.label, "precision": v.precision, "channels_last": v.channels_last,
                               "compile": v.compile}
        for m in methods:
            med = statistics.median(times[(v, m)])
            row[m] = med
            row[f"{m}_images_per_s"] = batch_size / med
            if memory:
                row[f"{m}_peak_mb"] = peak_memory(setups[(v, m)].step, device) / 2**20
        if "standard" in methods and "feature-scatter" in methods:
            row["ratio_fs_standard"] = row["feature-scatter"] / row["standard"]
        rows.append(row)
    base = next((r for r in rows if r["variant"] == "fp32"), None)
    for r in rows:
        if base is not None:
            for m in methods:
                r[f"{m}_speedup_vs_fp32"] = base[m] / r[m]
    return rows


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
        _sync(device)
        t0 = time.perf_counter()
        once()
        _sync(device)
        if rep:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"attack": attack, "variant": variant.label, "batch_size": batch_size, "seconds_per_batch": med,
            "images_per_s": batch_size / med}


def default_variant_models(models: list[str], device: torch.device) -> list[str]:
    """Models of the variants table: all on CUDA; on the CPU the first small one (bf16 is emulated
    on CPUs without native bf16 and costs many times fp32)."""
    if device.type == "cuda":
        return list(models)
    small = [m for m in models if m.startswith(("small-cnn", "mlp"))]
    return small[:1] or list(models[:1])


def cpu_bf16_native() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (else it is emulated, and slow)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def run_bench(
    models: list[str] | None = None, repeats: int = 5, batch_size: int = 60, device: str = "auto",
    progress: Any = None, variants: list[Variant] | None = None, variant_models: list[str] | None = None,
    variant_repeats: int | None = None, memory: bool = True, threads: int | None = None,
    evaluation: bool = True,
) -> dict[str, Any]:
    """All benchmark figures as one JSON-ready dict (``threads``: torch's intra-op threads;
    ``evaluation``: add PGD-20 against torchattacks' PGD and AutoAttack throughput)."""
    from fsapp.engine.train import pick_device

    dev = pick_device(device)
    if threads:
        torch.set_num_threads(threads)
    models = list(models or DEFAULT_MODELS)
    variants = list(DEFAULT_VARIANTS if variants is None else variants)
    vmodels = default_variant_models(models, dev) if variant_models is None else list(variant_models)
    out: dict[str, Any] = {"device": str(dev), "batch_size": batch_size, "repeats": repeats,
                           "torch": torch.__version__, "threads": torch.get_num_threads(), "train_step": {},
                           "variants": {}, "notes": []}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
        if memory:
            out["notes"].append(
                "peak memory: torch.cuda.max_memory_allocated during one step, above the memory held "
                "before it")
    else:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["cpu_bf16_native"] = cpu_bf16_native()
        if memory:
            out["notes"].append("peak memory: the most bytes that tensors allocated during one step held "
                                "at once (profiler memory events; the model, its gradients and optimiser "
                                "state allocated before the step are not counted)")
        if not out["cpu_bf16_native"] and any(v.precision != "fp32" for v in variants) and vmodels:
            out["notes"].append("this CPU has no native bf16: oneDNN emulates it, so bf16 rows are slower "
                                "than fp32 here; they still show that bf16 training runs")
    for spec in models:
        if progress is not None:
            progress.print(f"timing training steps of {spec} ...")
        t = time_train_steps(spec, batch_size, repeats, dev)
        t["ratio_fs_standard"] = t["feature-scatter"] / t["standard"]
        t["ratio_madry_standard"] = t["madry"] / t["standard"]
        t["ratio_fs_standard_min"] = t["min"]["feature-scatter"] / t["min"]["standard"]
        if "cpu" in t:
            t["ratio_fs_standard_cpu"] = t["cpu"]["feature-scatter"] / t["cpu"]["standard"]
        out["train_step"][spec] = t
    for spec in vmodels:
        if not variants:
            break
        if progress is not None:
            progress.print(f"timing {', '.join(v.label for v in variants)} on {spec} ...")
        out["variants"][spec] = time_variants(spec, variants, batch_size, variant_repeats or repeats, dev,
                                              memory=memory)
    if evaluation:
        from fsapp.engine.evalbench import eval_bench

        out["eval"] = eval_bench(device=str(dev), repeats=min(repeats, 3), progress=progress)
    return out
