"""Training-step figures of ``fsapp bench``: standard, Madry and Feature Scattering steps on the
same model and batch, as ratios, and the effect of the execution options (precision, memory
layout, ``torch.compile``) with the peak memory of each step.

Repetitions are interleaved (standard, madry, feature-scatter, standard, ...) and the median of
each is reported, so the ratios are measured under the same machine load (the minimum is
reported too: on a shared machine it is the least disturbed estimate). Peak memory: CUDA's
``max_memory_allocated`` above the memory held before the step; on the CPU the peak of the bytes
tensors allocated during the step (profiler memory events).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fsapp.bench.timing import measure, peak_memory
from fsapp.engine.step import training_step
from fsapp.losses import OuterLoss

DEFAULT_MODELS = ("small-cnn", "wrn:depth=16,widen=4")
METHODS = {
    "standard": ("none", OuterLoss("ce")),
    "madry": ("supervised:epsilon=8/255,step_size=2/255,steps=7", OuterLoss("ce")),
    "feature-scatter": ("feature-scatter:epsilon=8/255,step_size=8/255,steps=1", OuterLoss("soft-ce", 0.5)),
}
"""Each method's perturbation spec and outer loss."""
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
    loss: OuterLoss
    precision: str
    x: torch.Tensor
    y: torch.Tensor

    def step(self) -> None:
        """One training step, checked for a non-finite loss the way the loop does on this device:
        with a host read on the CPU (free there), on the device elsewhere."""
        training_step(self.net, self.perturb, self.optimizer, self.scaler, self.x, self.y, self.loss,
                      self.precision, sync=self.x.device.type == "cpu")


def _setup(model_spec: str, method: str, variant: Variant, batch_size: int, device: torch.device,
           shape: tuple[int, int, int], num_classes: int) -> _Setup:
    from fsapp.plugins import get_registry

    torch.manual_seed(0)
    model, net = build_model(model_spec, device, variant, shape, num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=variant.precision == "fp16")
    spec, loss = METHODS[method]
    x, y = synthetic_batch(batch_size, shape, num_classes, device, variant.channels_last)
    perturb = get_registry().create("perturbation", spec)
    return _Setup(net, model, perturb, opt, scaler, loss, variant.precision, x, y)


def _interleaved(setups: dict[Any, _Setup], repeats: int, device: torch.device, warmup: int = 1,
                 cpu_times: dict[Any, list[float]] | None = None) -> dict[Any, list[float]]:
    """Wall seconds per step of each setup, repetitions interleaved across setups; the process's
    CPU seconds per step go to ``cpu_times`` when given."""
    times: dict[Any, list[float]] = {k: [] for k in setups}
    for rep in range(repeats + warmup):
        for key, s in setups.items():
            wall, cpu = measure(s.step, device)
            if rep >= warmup:
                times[key].append(wall)
                if cpu_times is not None:
                    cpu_times.setdefault(key, []).append(cpu)
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
