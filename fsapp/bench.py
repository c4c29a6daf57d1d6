"""``fsapp bench``: training-step cost of standard, Madry and Feature Scattering, as ratios.

Every method runs on the same model and the same batch; repetitions are interleaved
(standard, madry, feature-scatter, standard, ...) and the median of each is reported, so the
ratios are measured in one run under the same machine load.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from fsapp.engine.step import training_step

DEFAULT_MODELS = ("small-cnn", "wrn:depth=16,widen=4")
METHODS = {
    "standard": ("none", 0.0),
    "madry": ("supervised:epsilon=8/255,step_size=2/255,steps=7", 0.0),
    "feature-scatter": ("feature-scatter:epsilon=8/255,step_size=8/255,steps=1", 0.5),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_steps(
    model_spec: str, batch_size: int, repeats: int, device: torch.device, precision: str = "fp32",
    shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
) -> dict[str, float]:
    """Median seconds per training step of each method, interleaved."""
    from fsapp.plugins import get_registry

    reg = get_registry()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch_size, *shape), generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    setups = {}
    for method, (spec, smoothing) in METHODS.items():
        torch.manual_seed(0)
        model = reg.create("model", model_spec, num_classes=num_classes, channels=shape[0], size=shape[1],
                           mean=(0.5,), std=(0.25,)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        setups[method] = (model, reg.create("perturbation", spec), opt, scaler, smoothing)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for rep in range(repeats + 1):
        for method, (model, perturb, opt, scaler, smoothing) in setups.items():
            _sync(device)
            t0 = time.perf_counter()
            training_step(model, perturb, opt, scaler, x, y, smoothing, precision)
            _sync(device)
            if rep > 0:  # the first round warms up
                times[method].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}


def run_bench(
    models: list[str] | None = None, repeats: int = 5, batch_size: int = 60, device: str = "auto",
    progress: Any = None,
) -> dict[str, Any]:
    """All benchmark figures as one JSON-ready dict."""
    from fsapp.engine.train import pick_device

    dev = pick_device(device)
    out: dict[str, Any] = {"device": str(dev), "batch_size": batch_size, "repeats": repeats,
                           "torch": torch.__version__, "threads": torch.get_num_threads(), "train_step": {}}
    for spec in models or list(DEFAULT_MODELS):
        if progress is not None:
            progress.print(f"timing training steps of {spec} ...")
        t = time_train_steps(spec, batch_size, repeats, dev)
        t["ratio_fs_standard"] = t["feature-scatter"] / t["standard"]
        t["ratio_madry_standard"] = t["madry"] / t["standard"]
        out["train_step"][spec] = t
    return out
