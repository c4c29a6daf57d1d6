"""``fsapp bench``: what a training step and an evaluation cost, as figures and ratios.

- :mod:`fsapp.bench.train`: standard, Madry and Feature Scattering steps on the same model and
  batch, and the execution options (precision, channels-last, ``torch.compile``) with peak memory;
- :mod:`fsapp.bench.evaluation`: fsapp's PGD against torchattacks' and AutoAttack on a small
  trained CNN, and one attack's throughput on a synthetic batch;
- :mod:`fsapp.bench.timing`: the one timing helper (seconds between device syncs, peak memory).

:func:`run_bench` gathers every figure as one JSON-ready dict. These are also the building blocks
of ``benchmarks/gpu_bench.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from fsapp.bench.evaluation import time_attack
from fsapp.bench.timing import peak_memory
from fsapp.bench.train import (
    DEFAULT_MODELS,
    DEFAULT_VARIANTS,
    METHODS,
    Variant,
    cpu_bf16_native,
    default_variant_models,
    time_train_steps,
    time_variants,
)

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_VARIANTS",
    "METHODS",
    "Variant",
    "peak_memory",
    "run_bench",
    "time_attack",
    "time_train_steps",
    "time_variants",
]


def run_bench(
    models: list[str] | None = None, repeats: int = 5, batch_size: int = 60, device: str = "auto",
    progress: Any = None, variants: list[Variant] | None = None, variant_models: list[str] | None = None,
    variant_repeats: int | None = None, memory: bool = True, threads: int | None = None,
    evaluation: bool = True,
) -> dict[str, Any]:
    """All benchmark figures as one JSON-ready dict (``threads``: torch's intra-op threads;
    ``evaluation``: add PGD-20 against torchattacks' PGD and AutoAttack throughput)."""
    from fsapp.engine.distributed import pick_device

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
        from fsapp.bench.evaluation import eval_bench

        out["eval"] = eval_bench(device=str(dev), repeats=min(repeats, 3), progress=progress)
    return out

