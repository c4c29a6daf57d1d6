"""fsapp on one GPU: training and evaluation throughput, peak memory, projected paper run time.

Sections (``--section``), each meant to run in its own process under a time limit (gpu.sh):

- ``train``: images/s of standard and Feature Scattering training steps of WRN-28-10 at batch 60
  for fp32, bf16 and bf16+channels_last (interleaved repetitions, medians), with the peak memory
  of each step;
- ``compile``: the same for bf16+channels_last+torch.compile (compilation is slow, so it is apart);
- ``eval``: images/s of PGD-20 evaluation (fp32, eval mode, eps 8/255, step 2/255, random start);
- ``summary``: reads the sections' JSON files and prints the table and the projected wall time of
  the ``paper-cifar10`` preset (200 epochs of ceil(50000/60) Feature Scattering steps, plus the
  live evaluation of each epoch: ``eval.n`` samples under each of ``eval.attacks``).

Data are synthetic CIFAR-shaped tensors (the timing does not depend on pixel values). Needs torch,
pluggy and safetensors (plus numpy, which torch installs); never the TUI. ``--tiny`` runs a small
model for a few repetitions, to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing fsapp
    sys.path.insert(0, str(ROOT))

from fsapp.bench import Variant, time_attack, time_variants  # noqa: E402

TRAIN_SIZE = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257}
TRAIN_VARIANTS = [Variant("fp32"), Variant("bf16"), Variant("bf16", True)]
COMPILE_VARIANTS = [Variant("bf16", True, True)]


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=["train", "compile", "eval", "summary", "all"], default="all")
    p.add_argument("--model", default="wrn:depth=28,widen=10")
    p.add_argument("--batch-size", type=int, default=60)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--eval-repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="where the sections' JSON goes")
    p.add_argument("--tiny", action="store_true", help="small model, few repetitions (a CPU check)")
    a = p.parse_args(argv)
    if a.tiny:
        a.model, a.batch_size, a.repeats, a.eval_batch, a.eval_repeats = "small-cnn:width=8,hidden=16", 8, 2, 16, 1
    return a


def _device(name: str) -> torch.device:
    from fsapp.engine.distributed import pick_device

    return pick_device(name)


def _header(dev: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(dev), "torch": torch.__version__}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    return info


def _print_rows(model: str, batch: int, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(f"  train {model} batch {batch} {r['variant']:<28} "
              f"standard {r['standard_images_per_s']:8.1f} img/s  feature-scatter "
              f"{r['feature-scatter_images_per_s']:8.1f} img/s  FS/std {r['ratio_fs_standard']:.2f}x  "
              f"peak {r.get('standard_peak_mb', float('nan')):.0f} / "
              f"{r.get('feature-scatter_peak_mb', float('nan')):.0f} MiB", flush=True)


def section_train(a: argparse.Namespace, variants: list[Variant]) -> dict[str, Any]:
    dev = _device(a.device)
    t0 = time.perf_counter()
    rows = time_variants(a.model, variants, a.batch_size, a.repeats, dev)
    _print_rows(a.model, a.batch_size, rows)
    return {**_header(dev), "model": a.model, "batch_size": a.batch_size, "repeats": a.repeats, "rows": rows,
            "seconds": time.perf_counter() - t0}


def section_eval(a: argparse.Namespace) -> dict[str, Any]:
    dev = _device(a.device)
    t0 = time.perf_counter()
    out = time_attack(a.model, "pgd:steps=20,eps=8/255,step_size=2/255", a.eval_batch, a.eval_repeats, dev)
    print(f"  eval {a.model} PGD-20 (fp32, batch {a.eval_batch}): {out['images_per_s']:.1f} img/s", flush=True)
    return {**_header(dev), "model": a.model, **out, "seconds": time.perf_counter() - t0}


def projection(rows: list[dict[str, Any]], eval_ips: float | None, preset: str = "paper-cifar10") -> dict[str, Any]:
    """Projected wall time of ``preset`` from measured step times and evaluation throughput."""
    from fsapp.config import preset as load_preset

    cfg = load_preset(preset)
    n_train = TRAIN_SIZE[cfg.data.name]
    steps = math.ceil(n_train / cfg.data.batch_size)
    eval_images = cfg.eval.n * len(cfg.eval.attacks)  # PGD-20 and CW-20 cost the same per image
    eval_s = eval_images / eval_ips if eval_ips else 0.0
    evals = math.ceil(cfg.schedule.epochs / cfg.eval.every)
    out: dict[str, Any] = {"preset": preset, "epochs": cfg.schedule.epochs, "steps_per_epoch": steps,
                           "eval_seconds_per_epoch": eval_s, "by_variant": {}}
    for r in rows:
        train_s = cfg.schedule.epochs * steps * r["feature-scatter"]
        out["by_variant"][r["variant"]] = {"hours": (train_s + evals * eval_s) / 3600,
                                           "train_hours": train_s / 3600}
    return out


def section_summary(a: argparse.Namespace) -> dict[str, Any]:
    parts = {name: json.loads((a.out / f"{name}.json").read_text())
             for name in ("train", "compile", "eval") if (a.out / f"{name}.json").exists()}
    rows = parts.get("train", {}).get("rows", []) + parts.get("compile", {}).get("rows", [])
    eval_ips = parts.get("eval", {}).get("images_per_s")
    head = next(iter(parts.values()), {})
    print(f"fsapp GPU benchmark: {head.get('gpu', head.get('device', '?'))}, torch {head.get('torch', '?')}, "
          f"model {head.get('model', a.model)}, batch {head.get('batch_size', a.batch_size)}")
    _print_rows(head.get("model", a.model), head.get("batch_size", a.batch_size), rows)
    if "compile" not in parts:
        print("  (no compile figures: that section did not finish in its time limit, or was not run)")
    if eval_ips:
        print(f"  eval PGD-20 images/s (fp32): {eval_ips:.1f}")
    summary: dict[str, Any] = {"sections": parts}
    if rows:
        proj = projection(rows, eval_ips)
        summary["projection"] = proj
        print(f"  projected {proj['preset']} wall time ({proj['epochs']} epochs x {proj['steps_per_epoch']} "
              f"feature-scatter steps + {proj['eval_seconds_per_epoch']:.0f} s live evaluation per epoch):")
        for label, p in proj["by_variant"].items():
            print(f"    {label:<28} {p['hours']:6.1f} h  (training {p['train_hours']:.1f} h)")
    return summary


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    sections = ["train", "eval", "compile", "summary"] if a.section == "all" else [a.section]
    for name in sections:
        t0 = time.perf_counter()
        if name == "train":
            data = section_train(a, TRAIN_VARIANTS)
        elif name == "compile":
            data = section_train(a, COMPILE_VARIANTS)
        elif name == "eval":
            data = section_eval(a)
        else:
            data = section_summary(a)
        (a.out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
        print(f"  [{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
